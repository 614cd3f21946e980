"""DeepSpeed-Chat's three RLHF steps (SFT, reward model, PPO) as a library and the `rlhf` command.

Importable with torch and transformers only; DeepSpeed is imported inside `rlhf_engine.engine`.
"""

__version__ = "0.1.0"
