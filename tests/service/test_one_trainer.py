"""Never two trainers on one job, whatever dies (PostgreSQL + Redis + Celery + real steps).

Before: a SIGKILLed worker left its step process training (it runs in a session of its own, so it
is not in the worker's group), the sweeper queued the job again, and the next worker started a
second trainer into the same folder. Now the step watches its worker, the folder has one writer,
and writes are fenced by the attempt number (rlhf_engine/runtime/fencing.py).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from sqlalchemy import select

from rlhf_engine.runtime import checkpoint
from rlhf_engine.stages.records import read_jsonl
from service.db.models import CostInterval, Job, JobMetric
from service.db.session import session_scope
from tests.service.conftest import Stack, events, wait_for

STEPS = 300
BODY = {
    "model": "tiny-opt-xs",
    "preset": "tiny",
    "config": {
        "sft": {"max_steps": STEPS, "checkpoint_interval": 25, "keep_checkpoints": 2, "eval_max_rows": 16}
    },
}


def trainers(output_dir: str) -> list[psutil.Process]:
    """Step processes of this job (`python -m rlhf_engine.cli sft --config OUTPUT_DIR/configs/…`), one per
    process tree: a step's own children (its launched ranks, or a compiler it starts, which shows the
    step's command line between fork and exec) are part of that trainer, not another one."""
    found = []
    for p in psutil.process_iter(["cmdline", "status", "ppid"]):
        cmd = p.info["cmdline"] or []
        if (
            p.info["status"] != psutil.STATUS_ZOMBIE
            and "rlhf_engine.cli" in cmd
            and any(output_dir in a for a in cmd)
        ):
            found.append(p)
    pids = {p.pid for p in found}
    return [p for p in found if p.info["ppid"] not in pids]


class TrainerCount:
    """Counts the job's step processes every 0.1 s in the background; `most` is the highest count seen."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir, self.most, self._stop = output_dir, 0, threading.Event()
        self.seen: list[tuple[int, int, str]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            found = trainers(self.output_dir)
            if len(found) > self.most:  # who they were, for the assertion's message
                self.most = len(found)
                self.seen = [(p.pid, p.ppid(), " ".join(p.info["cmdline"] or [])[-120:]) for p in found]

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


@pytest.fixture(scope="module")
def stack(kill_stack: Stack) -> Stack:
    return kill_stack


@pytest.fixture
def new_worker(
    stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]]
) -> Callable[[], subprocess.Popen[bytes]]:
    """Workers for one case, all stopped at its end (the next case must find only its own)."""
    return functools.partial(case_workers, stack)


def _output_dir(stack: Stack, job_id: str) -> str:
    with session_scope(stack.settings.db_url) as s:
        return s.get(Job, job_id).output_dir  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["worker process", "worker group", "step alone"])
def test_exactly_one_trainer_after_a_kill(
    kill: str, stack: Stack, new_worker: Callable[[], subprocess.Popen[bytes]]
) -> None:
    worker = new_worker()
    with stack.client(stack.key(f"kill-{kill.replace(' ', '-')}")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=BODY).json()
        url = f"/v1/fine_tuning/jobs/{job['id']}"
        deadline = time.monotonic() + 180
        while not c.get(f"{url}/checkpoints").json()["data"]:
            assert time.monotonic() < deadline, c.get(url).json()
            time.sleep(0.2)
        out = _output_dir(stack, job["id"])
        step_dir = Path(out) / "step1_sft"
        [step] = trainers(out)
        count = TrainerCount(out)
        if kill == "step alone":  # the OOM killer's choice: the worker lives and restarts the step
            step.kill()
        else:
            if kill == "worker process":
                os.kill(worker.pid, signal.SIGKILL)  # Celery alone (an OOM kill, a crash)
            else:
                # the worker's whole group (the step has a session of its own)
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            # the orphaned step notices at once, checkpoints at its next boundary and leaves by itself
            deadline = time.monotonic() + 30
            while trainers(out):
                assert time.monotonic() < deadline, "the orphaned step is still training"
                time.sleep(0.1)
            stopped = [e for e in read_jsonl(step_dir / "events.jsonl") if e["type"] == "step_stopped"]
            assert stopped, "the orphan left without a checkpoint"
            assert not (step_dir / "summary.json").exists()
            new_worker()  # its sweeper finds the job once the dead worker's lease runs out
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=240)
        assert done["status"] == "succeeded", done
        assert count.close() == 1  # never two at once, from the kill to the end
        msgs = [e["message"] for e in events(c, job["id"])]

    # the file and the database hold each optimizer step exactly once
    assert [m["step"] for m in read_jsonl(step_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    with session_scope(stack.settings.db_url) as s:
        steps = s.scalars(select(JobMetric.global_step).where(JobMetric.job_id == job["id"])).all()
        costs = s.scalars(select(CostInterval).where(CostInterval.job_id == job["id"])).all()
        record = s.get(Job, job["id"])
        assert record is not None and record.started_at is not None and record.finished_at is not None
        span = (record.finished_at - record.started_at).total_seconds()
        attempts = record.attempts
    assert sorted(steps) == list(range(1, STEPS + 1))
    # the checkpoints left are complete and load (DeepSpeed's files, RNG state, trainer state)
    kept = checkpoint.complete_checkpoints(step_dir / "checkpoints")
    assert kept and all(checkpoint.read_state(folder)["global_step"] == n for n, folder in kept)
    from safetensors.torch import load_file

    for _, folder in kept:
        assert load_file(str(folder / "rng_state_rank0.safetensors"))["torch_cpu"].numel() > 0
        assert any((folder / "model").glob("*model_states.pt"))
    # billed once: one row per interval, and no more seconds than the job's wall time (two trainers
    # billed side by side would exceed it)
    assert len({(r.step, r.attempt, r.interval) for r in costs}) == len(costs)
    assert sum(r.seconds for r in costs) <= span + 1.0, (sum(r.seconds for r in costs), span)
    if kill == "step alone":
        assert attempts == 1 and any("was killed by signal 9; restarting it" in m for m in msgs), msgs
    else:
        assert attempts == 2 and any("stopped reporting" in m for m in msgs), msgs
    resumed = [m for m in msgs if "resuming at step" in m]
    assert resumed, msgs
