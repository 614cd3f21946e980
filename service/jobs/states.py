"""The names of a job's life: its statuses, its steps' statuses, what the API asks of a worker, how a
step attempt ends, and the table of allowed status transitions.

Plain `Literal` types (mypy rejects "canceled"), importable from anywhere: this module imports
nothing of the service. `lifecycle.py` is the only code that moves a job along `TRANSITIONS`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

# OpenAI's statuses. `validating_files` is never entered here: files are validated when uploaded.
JobStatus = Literal["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[JobStatus, ...] = ("validating_files", "queued", "running", "paused")
TERMINAL: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")

StepStatus = Literal["pending", "running", "succeeded", "failed", "cancelled", "paused"]

# what the API asks of the worker that runs a job (Job.control)
Control = Literal["cancel", "pause"]

# why a worker asks its running step to checkpoint and stop (the STOP file's content)
StopReason = Literal["pause", "budget", "shutdown"]

# how one attempt at a step ended, as the worker saw it
StepOutcome = Literal["succeeded", "failed", "cancelled", "paused", "requeued", "lost", "killed", "stalled"]

# why a job left `running`, as recorded with it (Job.error.code when it failed)
FailureCode = Literal["step_failed"]

Actor = Literal["API", "worker", "sweeper"]


@dataclasses.dataclass(frozen=True)
class Transition:
    name: str
    source: tuple[JobStatus, ...]
    target: JobStatus
    by: Actor
    when: str


CREATE = Transition("create", (), "queued", "API", "a request passes every check")
CLAIM = Transition(
    "claim",
    ("queued", "running"),
    "running",
    "worker",
    "a worker takes the lease (from running only when the lease has expired)",
)
CANCEL = Transition(
    "cancel",
    ("validating_files", "queued", "running", "paused"),
    "cancelled",
    "API",
    "the user cancels; a running step is killed by its worker",
)
PAUSE_QUEUED = Transition("pause", ("queued",), "paused", "API", "the user pauses a job no worker has taken")
PAUSED = Transition(
    "paused",
    ("running",),
    "paused",
    "worker",
    "the user paused it or max_cost_usd was reached: the step checkpointed and stopped",
)
RESUME = Transition("resume", ("paused",), "queued", "API", "the user resumes it, within its budget")
REQUEUE = Transition(
    "requeue",
    ("running",),
    "queued",
    "worker",
    "the worker shuts down: the step checkpointed; another worker continues",
)
SWEEP = Transition(
    "sweep",
    ("queued", "running"),
    "queued",
    "sweeper",
    "the lease expired (the worker died) or the queue message was lost",
)
SUCCEED = Transition("succeed", ("running",), "succeeded", "worker", "every step wrote its summary")
FAIL = Transition(
    "fail",
    ("running",),
    "failed",
    "worker",
    "a step failed (or was killed or stalled more than RLHF_STEP_RESTARTS times)",
)

TRANSITIONS: tuple[Transition, ...] = (
    CREATE,
    CLAIM,
    CANCEL,
    PAUSE_QUEUED,
    PAUSED,
    RESUME,
    REQUEUE,
    SWEEP,
    SUCCEED,
    FAIL,
)


assert set(ACTIVE) | set(TERMINAL) == set(get_args(JobStatus))
assert not any(set(t.source) & set(TERMINAL) for t in TRANSITIONS), "a finished job never moves again"
