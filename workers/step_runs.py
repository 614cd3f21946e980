"""What every launch backend shares (workers/launchers.py, workers/kube.py): one attempt of a step as the
training task starts it, the handle it follows it by, and how a run ended. Stdlib only."""

from __future__ import annotations

import dataclasses
import math
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
    # a time limit or a preemption (the step checkpointed on the scheduler's signal, or was ended at the
    # limit): an attempt that carried the step's checkpoint on is submitted again without using a restart
    resumable: bool = False


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


def limit_minutes(estimate_s: float | None, *, factor: float, floor_min: int) -> int:
    """A step's time limit on a cluster (Slurm's --time, a TrainJob's activeDeadlineSeconds): `factor` ×
    its estimate, never under `floor_min` minutes."""
    return max(floor_min, math.ceil(estimate_s * factor / 60)) if estimate_s else floor_min
