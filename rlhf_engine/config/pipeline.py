"""`rlhf train`: the steps of a method as one command, configured once.

The pipeline config names the method (`rlhf`: SFT → reward model → PPO, DeepSpeed-Chat's three
steps; `dpo`: SFT → DPO), the input models, the run directory, what runs where, and options shared
by the steps (data, ZeRO stages); per-step options come from the `sft:`, `reward:`, `ppo:` and `dpo:`
sections of a config file, with exactly the fields of SFTConfig, RewardConfig, PPOConfig, DPOConfig.
`STEPS` is the one table of the steps: number, command, folder, title, config class.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from rlhf_engine.config.args import load_config_file
from rlhf_engine.config.data import DataConfig
from rlhf_engine.config.ppo import PPOConfig
from rlhf_engine.config.train import DPOConfig, RewardConfig, SFTConfig

Deployment = Literal["single_gpu", "single_node", "multi_node"]
PipelineKind = Literal["rlhf", "dpo"]


@dataclass(frozen=True)
class Step:
    """One training step: `rlhf <command>` writes RUN/<dir>/ (docs/contracts.md §1)."""

    number: int
    command: str  # also the name of its section in a pipeline config file
    dir: str
    title: str
    config: type


SFT = Step(1, "sft", "step1_sft", "step 1 (SFT)", SFTConfig)
REWARD = Step(2, "reward", "step2_reward", "step 2 (reward model)", RewardConfig)
PPO = Step(3, "ppo", "step3_rlhf", "step 3 (PPO)", PPOConfig)
DPO = Step(2, "dpo", "step2_dpo", "step 2 (DPO)", DPOConfig)
STEPS: dict[PipelineKind, dict[int, Step]] = {"rlhf": {1: SFT, 2: REWARD, 3: PPO}, "dpo": {1: SFT, 2: DPO}}
SECTIONS = ("sft", "reward", "ppo", "dpo")


@dataclass(frozen=True)
class Run:
    """What a kind of run trains: the step table it uses, its steps, and step 3's algorithm."""

    table: PipelineKind
    steps: tuple[int, ...]
    algorithm: str | None = None  # step 3's (ppo, grpo, rloo); None: the config's own


# The one table of which steps each kind of run takes (the CLI's `rlhf plan --method`, the service's
# job methods: supervised → sft, dpo → dpo, reinforcement → rlhf, or grpo with a grader).
RUNS: dict[str, Run] = {
    "rlhf": Run("rlhf", (1, 2, 3)),
    "dpo": Run("dpo", (1, 2)),
    "grpo": Run("rlhf", (1, 3), "grpo"),
    "rloo": Run("rlhf", (1, 3), "rloo"),
    "sft": Run("rlhf", (1,)),
    "reward": Run("rlhf", (2,)),
    "ppo": Run("rlhf", (3,), "ppo"),
}


@dataclass
class PipelineConfig:
    actor_model: str = field(
        default="", metadata={"help": "pretrained causal LM to fine-tune (path or hub id)"}
    )
    reward_model: str = field(
        default="", metadata={"help": "model to train as the reward model (path or hub id; method rlhf)"}
    )
    output_dir: str = field(
        default="output",
        metadata={
            "help": "run directory: step1_sft/, step2_reward/, step3_rlhf/ "
            "(method dpo: step1_sft/, step2_dpo/)"
        },
    )
    method: PipelineKind = field(
        default="rlhf",
        metadata={
            "help": "rlhf: SFT, reward model, PPO (DeepSpeed-Chat's "
            "three steps); dpo: SFT, then DPO on the preference pairs"
        },
    )
    step: list[int] = field(
        default_factory=lambda: [1, 2, 3],
        metadata={"help": "which steps to run (method dpo has steps 1 and 2; its default is both)"},
    )
    num_gpus: int = field(default=1, metadata={"help": "processes per node (GPUs; on CPU, CPU processes)"})
    deployment_type: Deployment = field(
        default="single_gpu",
        metadata={
            "help": "single_gpu: 1 process; single_node: num_gpus processes; multi_node: with --hostfile"
        },
    )
    hostfile: str = field(default="", metadata={"help": "DeepSpeed hostfile (multi_node)"})
    actor_zero_stage: int | None = field(
        default=None, metadata={"help": "ZeRO stage of the actor (steps 1 and 3)"}
    )
    reward_zero_stage: int | None = field(
        default=None, metadata={"help": "ZeRO stage of the reward model / critic (steps 2 and 3)"}
    )
    enable_tensorboard: bool = field(
        default=False,
        metadata={"help": "every step writes its metrics for TensorBoard (into its folder's tensorboard/)"},
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"flatten": True})

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if self.method not in STEPS:
            raise ValueError(f"method {self.method!r}: choose {' or '.join(STEPS)}")
        if self.method == "dpo" and self.step == [1, 2, 3]:
            self.step = list(RUNS["dpo"].steps)  # the default: every step of the method
        if not self.step or any(s not in STEPS[self.method] for s in self.step):
            raise ValueError(
                f"step {self.step}: method {self.method} has steps "
                f"{' '.join(map(str, STEPS[self.method]))}; give some of them"
            )
        if not self.actor_model and 1 in self.step:
            raise ValueError("actor_model: required for step 1; pass --actor-model PATH")
        if not self.reward_model and 2 in self.step and self.method == "rlhf":
            raise ValueError("reward_model: required for step 2; pass --reward-model PATH")
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus {self.num_gpus} must be at least 1")
        if self.deployment_type == "multi_node" and not self.hostfile:
            raise ValueError("deployment_type multi_node needs --hostfile (DeepSpeed's host list)")
        if self.deployment_type == "single_gpu" and self.num_gpus != 1:
            raise ValueError("deployment_type single_gpu runs 1 process; use single_node for --num-gpus > 1")
        for name in ("actor_zero_stage", "reward_zero_stage"):
            v = getattr(self, name)
            if v is not None and v not in (0, 1, 2, 3):
                raise ValueError(f"{name} {v} must be 0, 1, 2 or 3")

    def steps(self) -> dict[int, Step]:
        """The method's steps, by number."""
        return STEPS[self.method]

    def step_dir(self, step: int) -> Path:
        return Path(self.output_dir) / self.steps()[step].dir


def resolve_config_path(name: str) -> Path:
    """A config file path, or the name of a preset shipped with the package (`tiny`)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = resources.files("rlhf_engine.config") / "presets" / f"{name}.yaml"
    if preset.is_file():
        return Path(str(preset))
    raise ValueError(f"config: {name} is neither a file nor a preset ({', '.join(presets())})")


def presets() -> list[str]:
    folder = resources.files("rlhf_engine.config") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def split_sections(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A pipeline config file → (top-level values, {"sft": …, "reward": …, "ppo": …})."""
    top = {k: v for k, v in values.items() if k not in SECTIONS}
    sections = {}
    for s in SECTIONS:
        raw = values.get(s) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config: section {s} must be a mapping of {s} options")
        sections[s] = {str(k).replace("-", "_"): v for k, v in raw.items()}
    return top, sections


def load_pipeline_file(name: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    path = resolve_config_path(name)
    top, sections = _load_cached(str(path), path.stat().st_mtime_ns)
    return copy.deepcopy(top), copy.deepcopy(sections)


@functools.lru_cache(maxsize=32)
def _load_cached(path: str, mtime_ns: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Parsed once per file version (the job API reads the same preset for every submission)."""
    return split_sections(load_config_file(path))


def step_values(cfg: PipelineConfig, step: int, section: dict[str, Any]) -> dict[str, Any]:
    """Flat options of one step (the keys its command's flags and --config take), shared options first,
    the step's own section on top."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if v is not None}
    out: dict[str, Any] = dict(data)
    run: dict[str, Any] = {"output_dir": cfg.output_dir}
    if cfg.enable_tensorboard:
        run["enable_tensorboard"] = True
    if step == 1:
        out |= run | {"model_name_or_path": cfg.actor_model}
        if cfg.actor_zero_stage is not None:
            out["zero_stage"] = cfg.actor_zero_stage
    elif step == 2 and cfg.method == "dpo":
        out |= run | {"model_name_or_path": str(cfg.step_dir(1))}
        if cfg.actor_zero_stage is not None:
            out["zero_stage"] = cfg.actor_zero_stage
    elif step == 2:
        out |= run | {"model_name_or_path": cfg.reward_model}
        if cfg.reward_zero_stage is not None:
            out["zero_stage"] = cfg.reward_zero_stage
    else:
        out |= run | {
            "actor_model_name_or_path": str(cfg.step_dir(1)),
            "critic_model_name_or_path": str(cfg.step_dir(2)),
        }
        if cfg.actor_zero_stage is not None:
            out["actor_zero_stage"] = cfg.actor_zero_stage
        if cfg.reward_zero_stage is not None:
            out["critic_zero_stage"] = cfg.reward_zero_stage
    out |= section
    return out
