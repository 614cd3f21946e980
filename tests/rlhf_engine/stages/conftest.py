"""Fixtures for the training steps: real DeepSpeed runs of the `rlhf` command, shared where possible.

Every run is a subprocess, as a user or the training worker runs it; the session-scoped ones (one
SFT run, one reward-model run) serve many tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
SMALL = ["--max-seq-len", "128", "--eval-max-rows", "200"]


def rlhf(*args: object, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.run([sys.executable, "-m", "rlhf_engine.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)  # fmt: skip


def rlhf_ok(*args: object, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = rlhf(*args, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="session")
def base_model() -> Path:
    """The tiny OPT (≈0.5M parameters) pretrained 200 steps on the bundled corpus (cached)."""
    from rlhf_engine.models.tiny import build_tiny

    return build_tiny("opt", "xs", pretrain_steps=200)


SFT_ARGS = ["--per-device-train-batch-size", 8, "--gradient-accumulation-steps", 1, "--max-steps", 60,
            "--checkpoint-interval", 20, "--keep-checkpoints", 2, *SMALL]  # fmt: skip


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> Path:
    out = tmp_path_factory.mktemp("sft_run")
    rlhf_ok("sft", "--model", base_model, "--output-dir", out, *SFT_ARGS)
    return out / "step1_sft"


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> Path:
    # 3 epochs of the 1,440 bundled step-2 pairs (held-out accuracy reaches 1.0 after ~1.5 epochs)
    out = tmp_path_factory.mktemp("reward_run")
    rlhf_ok("reward", "--model", base_model, "--output-dir", out, "--per-device-train-batch-size", 8,
            "--gradient-accumulation-steps", 1, "--num-train-epochs", 3, "--learning-rate", "1e-3",
            "--weight-decay", 0, "--checkpoint-interval", 0, "--max-seq-len", 128, timeout=280)  # fmt: skip
    return out / "step2_reward"
