"""Step 3 (PPO) config: actor and critic options, DeepSpeed-Chat's constants as defaults.

DeepSpeed-Chat hard-codes kl_ctl, clip_reward_value, cliprange, cliprange_value, gamma, lam and the
EMA beta; here each is a field. Everything that cannot work together is refused in
`__post_init__`, before any model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_engine.config.data import DataConfig
from rlhf_engine.config.train import ModelOptions, Scheduler, Tracking, check_ranges


def _no_dropout() -> ModelOptions:
    # dropout makes the log-probs of experience and of training differ for the same weights,
    # which PPO's ratio reads as a policy change; DeepSpeed-Chat turns it off in step 3 too
    return ModelOptions(dropout=0.0)


@dataclass
class PPOConfig:
    actor_model_name_or_path: str = field(
        default="", metadata={"help": "the step-1 model (actor and reference)", "aliases": ["--actor-model"]}
    )
    critic_model_name_or_path: str = field(
        default="", metadata={"help": "the step-2 model (critic)", "aliases": ["--critic-model"]}
    )
    reward_model_name_or_path: str = field(
        default="",
        metadata={"help": "the reward model (default: the critic's path)", "aliases": ["--reward-model"]},
    )
    grader: str = field(
        default="",
        metadata={
            "help": "a grader (OpenAI's shape; a JSON file or inline JSON) as the "
            "reward instead of a reward model: string_check, text_similarity, score_model (a reward "
            "model as a part) or multi; templates read {{sample.output_text}} and {{item.<field>}}, the "
            "prompt row's other fields"
        },
    )
    response_format: str = field(
        default="",
        metadata={
            "help": "OpenAI's response_format (inline JSON): answers are sampled under its JSON schema "
            "(constrained decoding), so graders can read {{sample.output_json.<field>}}"
        },
    )
    output_dir: str = field(
        default="output", metadata={"help": "run directory; step 3 writes step3_rlhf/ in it"}
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"flatten": True})
    actor: ModelOptions = field(default_factory=_no_dropout, metadata={"prefix": "actor_"})
    critic: ModelOptions = field(default_factory=_no_dropout, metadata={"prefix": "critic_"})
    offload_reference_model: bool = field(
        default=False, metadata={"help": "keep the frozen reference on CPU (ZeRO-3 offload)"}
    )
    offload_reward_model: bool = field(
        default=False, metadata={"help": "keep the frozen reward model on CPU (ZeRO-3 offload)"}
    )
    enable_hybrid_engine: bool = field(
        default=False,
        metadata={
            "help": "DeepSpeed's HybridEngine (kernel injection) for generation: CUDA and supported "
            "architectures only; the default path runs everywhere"
        },
    )
    max_answer_len: int = field(default=256, metadata={"help": "max generated tokens per answer"})
    per_device_generation_batch_size: int = field(
        default=16, metadata={"help": "prompts per generation call per process"}
    )
    per_device_training_batch_size: int = field(
        default=16, metadata={"help": "experiences per PPO micro-batch"}
    )
    generation_batches: int = field(default=1, metadata={"help": "generation calls per PPO step"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each step's experience"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    actor_learning_rate: float = field(default=9.65e-6, metadata={"help": "actor peak learning rate"})
    critic_learning_rate: float = field(default=5e-6, metadata={"help": "critic peak learning rate"})
    actor_weight_decay: float = field(default=0.0, metadata={"help": "actor AdamW weight decay"})
    critic_weight_decay: float = field(default=0.0, metadata={"help": "critic AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2"})
    lr_scheduler_type: Scheduler = field(default="cosine", metadata={"help": "learning-rate schedule"})
    num_warmup_steps: int = field(default=100, metadata={"help": "linear warm-up optimizer steps"})
    gradient_clipping: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    num_train_epochs: int = field(default=1, metadata={"help": "passes over the step-3 prompts"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many PPO steps (0 = epochs decide)"})
    # --- PPO (DeepSpeed-Chat's values)
    kl_ctl: float = field(
        default=0.1, metadata={"help": "weight of the per-token KL penalty to the reference"}
    )
    clip_reward_value: float = field(
        default=5.0, metadata={"help": "reward-model scores are clipped to ±this"}
    )
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip ε"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip ε around the old values"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE λ"})
    # --- the algorithm: PPO (DeepSpeed-Chat's, with a critic) or group-relative (no critic)
    algorithm: Literal["ppo", "grpo", "rloo"] = field(
        default="ppo",
        metadata={
            "help": "ppo: clipped policy and "
            "value steps with GAE (DeepSpeed-Chat's); grpo / rloo: no "
            "critic, samples_per_prompt answers per prompt, advantages "
            "from the group (mean/std, or leave-one-out)"
        },
    )
    samples_per_prompt: int = field(
        default=1, metadata={"help": "answers sampled per prompt (grpo/rloo: at least 2)"}
    )
    kl_in: Literal["reward", "loss"] = field(
        default="reward",
        metadata={
            "help": "grpo/rloo: KL to the reference "
            "subtracted from the reward (kl_ctl × its sum; DeepSpeed-Chat's way) or "
            "added to the loss (kl_ctl × the k3 estimate; GRPO's way)"
        },
    )
    filter_groups: bool = field(
        default=False,
        metadata={
            "help": "grpo/rloo: leave out of the loss the groups whose "
            "rewards are all equal (they carry no signal)"
        },
    )
    # --- sampling
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the actor"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling p (1 = off)"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling (0 = off)"})
    reuse_generation_logits: bool = field(
        default=True,
        metadata={
            "help": "take the actor's log-probs of its answers from the logits generate() already "
            "computed instead of a second forward pass (off: DeepSpeed-Chat's extra pass)"
        },
    )
    # --- extras from InstructGPT
    enable_ema: bool = field(
        default=False, metadata={"help": "keep an exponential moving average of the actor"}
    )
    ema_beta: float = field(default=0.992, metadata={"help": "EMA β: ema = β·ema + (1−β)·actor"})
    unsup_coef: float = field(
        default=0.0,
        metadata={
            "help": "weight of the LM loss on unsup_data (PPO-ptx); 0 = off. "
            "DeepSpeed-Chat's 27.8 was unstable"
        },
    )
    # --- guard, evaluation, records
    degenerate_threshold: float = field(
        default=0.5,
        metadata={
            "help": "share of empty/repetitive answers in a batch above which DeepSpeed's hybrid "
            "engine is abandoned for the plain path"
        },
    )
    eval_interval: int = field(
        default=0, metadata={"help": "evaluate every N steps (0 = before and after only)"}
    )
    eval_max_rows: int = field(default=200, metadata={"help": "held-out prompts per evaluation (0 = all)"})
    rollouts_per_step: int = field(
        default=4, metadata={"help": "sampled rollouts written to rollouts.jsonl per step"}
    )
    checkpoint_interval: int = field(
        default=100, metadata={"help": "checkpoint every N PPO steps (0 = never)"}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    checkpoint_models: bool = field(
        default=True,
        metadata={
            "help": "write each checkpoint's actor as a Hugging Face folder too (one model write per "
            "checkpoint): what makes a checkpoint a model to chat with or train from"
        },
    )
    tracking: Tracking = field(default_factory=Tracking, metadata={"flatten": True})
    resume: bool = field(
        default=True, metadata={"help": "continue from the latest checkpoint if there is one"}
    )
    overwrite: bool = field(default=False, metadata={"help": "retrain even if step 3 already finished"})

    def __post_init__(self) -> None:
        for name, cls in (
            ("data", DataConfig),
            ("actor", ModelOptions),
            ("critic", ModelOptions),
            ("tracking", Tracking),
        ):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if not self.actor_model_name_or_path:
            raise ValueError("actor_model_name_or_path: required; pass --actor-model DIR (the step-1 output)")
        if self.algorithm == "ppo" and not self.critic_model_name_or_path:
            raise ValueError(
                "critic_model_name_or_path: required; pass --critic-model DIR (the step-2 output)"
            )
        if self.grader:
            from rlhf_engine import graders

            if self.reward_model_name_or_path:
                raise ValueError(
                    "reward_model_name_or_path: with a grader, the grader is the reward; to add a "
                    "reward model's score, make it a score_model part of a multi grader (model: its "
                    "path), or drop one of the two"
                )
            self.grader = json.dumps(graders.load(self.grader), sort_keys=True)  # the options record what ran
        elif not self.reward_path:
            raise ValueError(
                "reward_model_name_or_path: required; pass --reward-model DIR (the step-2 output), or "
                "--grader grader.json"
            )
        if self.response_format:
            from rlhf_engine.chat.structured import grammar_of

            try:
                fmt = json.loads(self.response_format)
            except json.JSONDecodeError as e:
                raise ValueError(f"response_format: is not valid JSON ({e.msg})") from None
            if not isinstance(fmt, dict):
                raise ValueError('response_format: give an object such as {"type": "json_schema", ...}')
            grammar_of(fmt)  # a schema the grammar engine cannot compile: refused naming the field
            self.response_format = json.dumps(fmt, sort_keys=True)
        if self.algorithm != "ppo" and self.samples_per_prompt < 2:
            raise ValueError(
                f"samples_per_prompt {self.samples_per_prompt}: {self.algorithm} compares each answer "
                "with the other answers to its prompt; give at least 2 (e.g. 4)"
            )
        if self.algorithm == "ppo" and (self.kl_in != "reward" or self.filter_groups):
            raise ValueError(
                "kl_in loss and filter_groups are options of grpo and rloo; set algorithm, or drop them"
            )
        check_ranges(
            self,
            positive=(
                "max_answer_len",
                "per_device_generation_batch_size",
                "per_device_training_batch_size",
                "samples_per_prompt",
                "generation_batches",
                "ppo_epochs",
                "gradient_accumulation_steps",
                "num_train_epochs",
                "keep_checkpoints",
            ),
            non_negative=(
                "max_steps",
                "num_warmup_steps",
                "eval_interval",
                "eval_max_rows",
                "rollouts_per_step",
                "checkpoint_interval",
                "kl_ctl",
                "clip_reward_value",
                "cliprange",
                "cliprange_value",
                "unsup_coef",
                "top_k",
                "actor_weight_decay",
                "critic_weight_decay",
                "gradient_clipping",
            ),
            learning_rates=("actor_learning_rate", "critic_learning_rate"),
            betas=("adam_beta1", "adam_beta2"),
        )
        for name in ("gamma", "lam", "ema_beta", "top_p", "degenerate_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} must be in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature {self.temperature} must be positive (PPO needs sampling)")
        self.tracking.check(self.output_dir)
        experiences = self.experiences_per_step()
        micro = self.per_device_training_batch_size * self.gradient_accumulation_steps
        if experiences % micro:
            raise ValueError(
                f"per_device_generation_batch_size × generation_batches × samples_per_prompt = {experiences} "
                f"experiences per step must divide into optimizer steps of per_device_training_batch_size × "
                f"gradient_accumulation_steps = {micro}; "
                "e.g. make them equal (DeepSpeed-Chat's stable setting)"
            )
        if self.data.max_prompt_len + self.max_answer_len > 100_000:
            raise ValueError(
                "max_prompt_len + max_answer_len is implausibly large; keep it within the model's context"
            )

    @property
    def seed(self) -> int:
        return self.data.seed

    def batch_rows(self, processes: int) -> tuple[int, str]:
        """Prompts one PPO step takes with `processes` data-parallel processes, and how."""
        n = self.per_device_generation_batch_size * self.generation_batches * processes
        return n, f"per_device_generation_batch_size × generation_batches × processes = {n}"

    @property
    def reward_path(self) -> str:
        """The reward model to load ("" when a grader is the reward)."""
        if self.grader:
            return ""
        return self.reward_model_name_or_path or self.critic_model_name_or_path

    def parsed_grader(self) -> Any:
        """The grader as `graders.Grader` (None when a reward model is the reward): the one place that
        turns the stored JSON back into a grader."""
        from rlhf_engine import graders

        return graders.parse(json.loads(self.grader)) if self.grader else None

    def experiences_per_step(self) -> int:
        """Answers one process samples (and trains on) per step."""
        return self.per_device_generation_batch_size * self.generation_batches * self.samples_per_prompt

    def optimizer_steps_per_ppo_step(self) -> int:
        experiences = self.experiences_per_step()
        return (
            self.ppo_epochs
            * experiences
            // (self.per_device_training_batch_size * self.gradient_accumulation_steps)
        )
