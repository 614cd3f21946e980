"""What every launch backend shares (workers/launchers.py, workers/kube.py): one attempt of a step as the
training task starts it, the handle it follows it by, and how a run ended. Stdlib only."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol


class LaunchError(Exception):
    """The scheduler refused the step (its own message): the step fails with it, nothing hangs."""


class SupersededLaunchError(LaunchError):
    """A newer attempt raised the step folder's fence while this one was starting: it never submits."""


@dataclasses.dataclass(frozen=True)
class Ended:
    """How a step's run ended: its exit status, and why, when something outside it ended it."""

    code: int
    killed_by: str = ""  # "" when the step exited by itself
    failed_because: str = ""  # why the scheduler will never run it (the step fails with this)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One attempt of one step, as the training task starts it."""

    job_id: str
    step: int
    attempt: int
    argv: list[str]  # `python -m rlhf_engine.cli <command> --config F`
    env: dict[str, str]
    log: Path
    step_dir: Path
    nodes: int = 1
    per_node: int = 1  # processes per node (GPUs; CPU processes on a CPU machine)
    gpus: bool = False  # ask the scheduler for GPUs (False on a CPU cluster)
    estimate_s: float | None = None


class StepRun(Protocol):
    label: str  # what the job's events call it: "pid 123", "slurm job 45"

    def poll(self) -> Ended | None:
        """How the run ended, or None while it is queued or running."""

    def running(self) -> bool:
        """True once the step holds its machines (a scheduler's queue is not billed)."""

    def waiting(self) -> str:
        """Why it is not running yet (the scheduler's reason), "" once it is."""

    def stop(self, grace: float) -> None:
        """End it: SIGTERM (the step checkpoints at its next boundary), the rest after `grace` s."""


# the worker's secrets, never passed to a step on another machine (an sbatch job's exported environment,
# a TrainJob's spec, a hostfile run's env file): the database and broker, the API's tokens, hub tokens.
# The judge token is the step's own (scoped to its job's judge route) and is passed.
SECRET_MARKS = ("DATABASE_URL", "REDIS_URL", "PASSWORD", "SECRET", "API_KEY", "TOKEN", "CREDENTIAL")
STEP_SECRETS_ALLOWED = frozenset({"RLHF_JUDGE_TOKEN"})


def step_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` without the worker's secrets (what a step needs is kept: paths, its attempt, offline flags)."""
    return {
        k: v
        for k, v in env.items()
        if k in STEP_SECRETS_ALLOWED or not any(mark in k.upper() for mark in SECRET_MARKS)
    }
