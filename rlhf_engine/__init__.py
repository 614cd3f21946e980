"""DeepSpeed-Chat's three RLHF steps (SFT, reward model, PPO) as a library and the `rlhf` command.

Importable with torch and transformers only; DeepSpeed is imported inside `rlhf_engine.runtime`.
"""

__version__ = "0.1.0"

from typing import Any

_LAZY = {
    "RLHFEngine": "rlhf_engine.runtime.engines",
    "PPOTrainer": "rlhf_engine.stages.ppo_trainer",
    "PPOConfig": "rlhf_engine.config.ppo",
}


def __getattr__(name: str) -> Any:
    """`from rlhf_engine import RLHFEngine, PPOTrainer, PPOConfig` without importing torch up front."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlhf_engine' has no attribute {name!r}")
