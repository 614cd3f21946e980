"""Fixtures for the training steps (the shared `rlhf train` run itself is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sft_run(pipeline_run: Path) -> Path:
    return pipeline_run / "step1_sft"


@pytest.fixture(scope="session")
def reward_run(pipeline_run: Path) -> Path:
    return pipeline_run / "step2_reward"
