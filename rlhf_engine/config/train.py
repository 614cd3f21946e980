"""Configs of the training steps: one dataclass per step, the single source of the CLI flags, the
config files, the job API's per-step configuration and the worker.

Defaults are DeepSpeed-Chat's single-GPU OPT-1.3B example (its
training_scripts/opt/single_gpu/run_1.3b.sh); every value is configurable. `__post_init__` rejects
what cannot work, naming the field and the fix, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf_engine.config.data import DataConfig

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
PreferenceLoss = Literal["sigmoid", "ipo", "simpo"]  # DPO's loss, IPO's, SimPO's (reference-free)


def check_ranges(
    config: object,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    learning_rates: tuple[str, ...] = (),
    betas: tuple[str, ...] = (),
) -> None:
    """The range checks every step config makes, each error naming the field and its allowed range."""
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} {getattr(config, name)} must be at least 1")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} {getattr(config, name)} must not be negative")
    for name in learning_rates:
        if not 0 < getattr(config, name) < 1:
            raise ValueError(f"{name} {getattr(config, name)} must be in (0, 1), e.g. 1e-5")
    for name in betas:
        if not 0 <= getattr(config, name) < 1:
            raise ValueError(f"{name} {getattr(config, name)} must be in [0, 1)")


@dataclass
class Tracking:
    """Where a step reports besides its own records: TensorBoard (DeepSpeed-Chat's flags) and Weights &
    Biases (OpenAI's `integrations: [{"type": "wandb", …}]`). Neither changes what the step computes."""

    enable_tensorboard: bool = field(default=False, metadata={"help": "write the metrics for TensorBoard"})
    tensorboard_path: str = field(
        default="",
        metadata={
            "help": "TensorBoard folder inside output_dir (relative: to "
            "output_dir; default: the step's folder/tensorboard)"
        },
    )
    wandb_project: str = field(
        default="",
        metadata={
            "help": "log to this Weights & Biases project (the wandb extra; "
            "WANDB_API_KEY and WANDB_MODE from the environment, e.g. WANDB_MODE=offline)"
        },
    )
    wandb_name: str = field(default="", metadata={"help": "W&B run name (each step adds its own suffix)"})
    wandb_entity: str = field(default="", metadata={"help": "W&B entity (team or user)"})
    wandb_tags: list[str] = field(default_factory=list, metadata={"help": "W&B run tags"})

    def check(self, output_dir: str) -> None:
        """A TensorBoard folder stays inside the run directory (a job's files never land elsewhere)."""
        from pathlib import Path

        if not self.tensorboard_path:
            return
        run = Path(output_dir).resolve()
        where = (run / self.tensorboard_path).resolve()
        if where != run and run not in where.parents:
            raise ValueError(
                f"tensorboard_path {self.tensorboard_path!r} is outside output_dir {str(run)!r}; give a "
                "folder inside it, e.g. tensorboard/ (or leave it empty for the step's own folder)"
            )


@dataclass
class ModelOptions:
    """How one trainable model runs under DeepSpeed (the step-3 actor and critic each have one)."""

    zero_stage: int = field(default=0, metadata={"help": "ZeRO stage 0-3"})
    offload: bool = field(
        default=False,
        metadata={"help": "offload optimizer state to CPU (and parameters at ZeRO-3); needs zero_stage >= 1"},
    )
    dtype: Dtype = field(
        default="auto",
        metadata={"help": "auto = bf16 on GPUs that have it, else fp16 on GPU, fp32 on CPU"},
    )
    lora_dim: int = field(default=0, metadata={"help": "LoRA rank; 0 = no LoRA"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: lora_dim, scale 1)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "module names LoRA adapts (peft target_modules); all-linear = every linear layer"},
    )
    only_optimize_lora: bool = field(
        default=False, metadata={"help": "train only the LoRA weights (and a value head); needs lora_dim > 0"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in backward"}
    )
    dropout: float | None = field(default=None, metadata={"help": "override the model's dropout rates"})
    zero_param_persistence_threshold: int | None = field(
        default=None,
        metadata={"help": "ZeRO-3 stage3_param_persistence_threshold (params smaller stay unpartitioned)"},
    )

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage {self.zero_stage} must be 0, 1, 2 or 3")
        if self.offload and self.zero_stage == 0:
            raise ValueError(
                "offload needs zero_stage 1, 2 or 3 (ZeRO-Offload); set zero_stage or drop offload"
            )
        if self.lora_dim < 0:
            raise ValueError(f"lora_dim {self.lora_dim} must be 0 (off) or a positive rank such as 8")
        if self.only_optimize_lora and self.lora_dim == 0:
            raise ValueError("only_optimize_lora needs lora_dim > 0; set lora_dim (e.g. 8) or drop the flag")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha {self.lora_alpha} must be positive")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module (or all-linear)")


@dataclass
class TrainConfig:
    """What steps 1 and 2 share."""

    model_name_or_path: str = field(
        default="", metadata={"help": "model directory or hub id to start from", "aliases": ["--model"]}
    )
    output_dir: str = field(
        default="output", metadata={"help": "run directory; the step writes a folder in it"}
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"flatten": True})
    model: ModelOptions = field(default_factory=ModelOptions, metadata={"flatten": True})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "micro-batch per process"})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "eval batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)"}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2"})
    lr_scheduler_type: Scheduler = field(default="cosine", metadata={"help": "learning-rate schedule"})
    num_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up optimizer steps"})
    num_train_epochs: int = field(default=1, metadata={"help": "passes over the training rows"})
    max_steps: int = field(
        default=0, metadata={"help": "stop after this many optimizer steps (0 = epochs decide)"}
    )
    gradient_clipping: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    eval_interval: int = field(
        default=0, metadata={"help": "evaluate every N steps (0 = before and after only)"}
    )
    eval_max_rows: int = field(default=0, metadata={"help": "evaluate on at most N rows (0 = all)"})
    eval_sample_rows: int = field(
        default=0,
        metadata={
            "help": "evaluations at eval_interval read at most N held-out rows, a fixed seeded sample "
            "(0 = as many as the others); before and after training every row is read"
        },
    )
    checkpoint_interval: int = field(default=100, metadata={"help": "checkpoint every N steps (0 = never)"})
    checkpoint_models: bool = field(
        default=True,
        metadata={
            "help": "write each checkpoint's model as a Hugging Face folder too (one model write per "
            "checkpoint): what makes a checkpoint a model to chat with or train from"
        },
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    tracking: Tracking = field(default_factory=Tracking, metadata={"flatten": True})
    resume: bool = field(
        default=True, metadata={"help": "continue from the step's latest checkpoint if there is one"}
    )
    overwrite: bool = field(default=False, metadata={"help": "retrain even if the step already finished"})

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if isinstance(self.model, dict):
            self.model = ModelOptions(**self.model)
        if isinstance(self.tracking, dict):
            self.tracking = Tracking(**self.tracking)
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path: required; pass --model DIR (a model directory or hub id)")
        if not self.output_dir:
            raise ValueError("output_dir: required")
        check_ranges(
            self,
            positive=(
                "per_device_train_batch_size",
                "per_device_eval_batch_size",
                "gradient_accumulation_steps",
                "num_train_epochs",
                "keep_checkpoints",
            ),
            non_negative=(
                "num_warmup_steps",
                "max_steps",
                "eval_interval",
                "eval_max_rows",
                "eval_sample_rows",
                "checkpoint_interval",
                "weight_decay",
                "gradient_clipping",
            ),
            learning_rates=("learning_rate",),
            betas=("adam_beta1", "adam_beta2"),
        )
        self.tracking.check(self.output_dir)

    @property
    def seed(self) -> int:
        return self.data.seed

    def batch_rows(self, processes: int) -> tuple[int, str]:
        """Training rows one optimizer step takes with `processes` data-parallel processes, and how."""
        n = self.per_device_train_batch_size * self.gradient_accumulation_steps * processes
        return n, f"per_device_train_batch_size × gradient_accumulation_steps × processes = {n}"


@dataclass
class SFTConfig(TrainConfig):
    """Step 1: supervised fine-tuning of the actor (loss on answer tokens only)."""

    per_device_train_batch_size: int = field(default=16, metadata={"help": "micro-batch per process"})
    gradient_accumulation_steps: int = field(default=8, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)"}
    )


@dataclass
class RewardConfig(TrainConfig):
    """Step 2: reward model = causal-LM backbone + scalar head, pairwise loss."""

    gradient_accumulation_steps: int = field(default=4, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW weight decay (not on biases and norms)"}
    )
    model: ModelOptions = field(default_factory=lambda: ModelOptions(dropout=0.0), metadata={"flatten": True})


@dataclass
class DPOConfig(TrainConfig):
    """Step 2, the DPO way (DeepSpeed-Chat's step2_dpo): the step-1 model learns from the chosen and
    rejected answers of step 2's data directly, against a frozen copy of itself; no reward model, no
    step 3. Writes a causal LM, the chat model of the run."""

    per_device_train_batch_size: int = field(default=8, metadata={"help": "preference pairs per micro-batch"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)"}
    )
    beta: float = field(
        default=0.1, metadata={"help": "strength of the pull towards the reference (DPO's beta)"}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "probability that a pair's preference is wrong (conservative DPO); in [0, 0.5)"},
    )
    loss: PreferenceLoss = field(
        default="sigmoid",
        metadata={"help": "sigmoid = DPO, ipo = IPO, simpo = SimPO (reference-free, length-normalised)"},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin"})
    rpo_alpha: float = field(
        default=0.0, metadata={"help": "add this times the SFT loss of the chosen answer (RPO); 0 = off"}
    )
    reference_model_name_or_path: str = field(
        default="",
        metadata={
            "help": "the frozen reference (default: the model being trained, as it was before this step)"
        },
    )
    offload_reference_model: bool = field(
        default=False,
        metadata={"help": "keep the reference's weights in CPU memory (ZeRO-3 parameter offload)"},
    )
    model: ModelOptions = field(default_factory=lambda: ModelOptions(dropout=0.0), metadata={"flatten": True})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta {self.beta} must be positive, e.g. 0.1")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing {self.label_smoothing} must be in [0, 0.5)")
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError(
                "label_smoothing applies to the sigmoid and simpo losses, not ipo; drop one of them"
            )
        check_ranges(self, non_negative=("simpo_gamma", "rpo_alpha"))
        if self.loss == "simpo" and (self.reference_model_name_or_path or self.offload_reference_model):
            raise ValueError(
                "loss simpo is reference-free: drop reference_model_name_or_path and "
                "offload_reference_model (or choose loss sigmoid or ipo)"
            )
