"""A stalled step is noticed, ended and retried; one that stalls every time fails with the reason
(PostgreSQL, Redis, a real Celery worker, real steps; workers/watch.py).

Two real ways a step stops making progress, no test hook in the product: the step process frozen
(SIGSTOP — a process stuck in the kernel looks the same), and the op build's lock held by a live
process outside the project's lock (another build on a shared cache that never ends).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from rlhf_engine.runtime import ops
from rlhf_engine.stages import phase
from rlhf_engine.stages.records import read_jsonl
from service.db.models import CostInterval, Job
from service.db.session import session_scope
from tests.service.conftest import Stack, events, wait_for
from tests.service.test_one_trainer import trainers

# creates a file, keeps it open, says a word and sleeps: `hold_file.py PATH WORD SECONDS`
HOLD_FILE = Path(__file__).resolve().parents[1] / "helpers" / "hold_file.py"
FLOOR_S = 4.0
STEPS = 300  # ≈ 10 s of training: frozen well before its end
BODY = {
    "model": "tiny-opt-xs",
    "preset": "tiny",
    "config": {"sft": {"max_steps": STEPS, "checkpoint_interval": 25, "eval_max_rows": 16}},
}


@pytest.fixture(scope="module")
def stack(kill_stack: Stack) -> Stack:
    return kill_stack


@pytest.fixture
def worker(
    stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]]
) -> Callable[..., subprocess.Popen[bytes]]:
    # a phase may go 4 s without progress (the tiny job's slowest phase takes under 2 s here), and a
    # stalled step is restarted once
    bounds = {"RLHF_STALL_FLOOR_S": str(FLOOR_S), "RLHF_STALL_FACTOR": "1", "RLHF_STEP_RESTARTS": "1"}
    return functools.partial(case_workers, stack, **bounds)


def _output_dir(stack: Stack, job_id: str) -> Path:
    with session_scope(stack.settings.db_url) as s:
        return Path(s.get(Job, job_id).output_dir)  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_frozen_step_is_ended_and_resumed_and_its_phase_is_shown(
    stack: Stack, worker: Callable[..., Any]
) -> None:
    worker()
    with stack.client(stack.key("frozen")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=BODY).json()
        url = f"/v1/fine_tuning/jobs/{job['id']}"
        deadline = time.monotonic() + 120
        while True:  # the job says what it does: the phase, its time so far, its bound
            shown = c.get(url).json()
            if (shown.get("phase") or {}).get("name") == "training" and shown["phase"]["step"] == 1:
                break
            assert time.monotonic() < deadline and shown["status"] in ("queued", "running"), shown
            time.sleep(0.2)
        assert shown["phase"]["description"].startswith("training step "), shown["phase"]
        assert shown["phase"]["bound_s"] >= FLOOR_S and shown["phase"]["elapsed_s"] >= 0
        out = _output_dir(stack, job["id"])
        while (phase.read(out / "step1_sft") or {}).get("global_step", 0) < 60:  # past two checkpoints
            assert time.monotonic() < deadline, phase.read(out / "step1_sft")
            time.sleep(0.1)
        [step] = trainers(str(out))
        os.kill(step.pid, signal.SIGSTOP)  # frozen: no progress, no beat, the lock still held
        frozen_at = time.time()
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=180)
        said = events(c, job["id"])
    assert done["status"] == "succeeded", done
    assert done["phase"] is None  # a finished job does nothing
    stalled = [e for e in said if e["data"]["event_type"] == "step_stalled"]
    assert len(stalled) == 1, [e["message"] for e in said]
    message = stalled[0]["message"]
    # frozen in a training step (or in the checkpoint that followed it): named with its time and bound
    named = re.search(
        r"stalled while (training step \d+ of 300|saving the checkpoint at step \d+) for (\d+) s "
        r"\(bound (\d+) s; [^)]+\); the attempt was ended and its cost stopped then",
        message,
    )
    assert named is not None and int(named.group(3)) >= FLOOR_S, message
    noticed = stalled[0]["created_at"] - frozen_at
    assert FLOOR_S - 1 <= noticed <= int(named.group(3)) + 6, noticed  # once its bound ran out, not later
    assert any("restarting step 1 from its last checkpoint (1 of 1)" in e["message"] for e in said)
    step_dir = out / "step1_sft"
    assert [m["step"] for m in read_jsonl(step_dir / "metrics.jsonl")] == list(range(1, STEPS + 1))
    with session_scope(stack.settings.db_url) as s:
        record = s.get(Job, job["id"])
        assert record is not None and record.started_at and record.finished_at
        costs = s.scalars(select(CostInterval).where(CostInterval.job_id == job["id"])).all()
        span = (record.finished_at - record.started_at).total_seconds()
    # billed once, and not past the moment the stall was seen: never more than the job's wall time
    assert len({(r.step, r.attempt, r.interval) for r in costs}) == len(costs)
    assert sum(r.seconds for r in costs) <= span + 1.0, (sum(r.seconds for r in costs), span)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cancelling_a_frozen_step_ends_it_after_its_grace_and_no_later(
    stack: Stack, case_workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """A step that cannot checkpoint (frozen) gets the cancellation's 10 s, then SIGKILL. Meanwhile the
    worker renews the job's lease from a thread (each 1 s here) while its follow loop has just written the
    job's row (a cost interval every pass, here): the renewal must not wait for the loop's transaction."""
    case_workers(stack, RLHF_COST_INTERVAL_S="0.2")
    with stack.client(stack.key("cancel-frozen")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=BODY).json()
        out = _output_dir(stack, job["id"])
        deadline = time.monotonic() + 120
        while ((phase.read(out / "step1_sft") or {}).get("global_step") or 0) < 5:
            assert time.monotonic() < deadline, phase.read(out / "step1_sft")
            time.sleep(0.1)
        [step] = trainers(str(out))
        os.kill(step.pid, signal.SIGSTOP)  # SIGTERM waits in vain; SIGKILL ends it
        cancelled_at = time.monotonic()
        assert c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        while "step_killed" not in [e["data"]["event_type"] for e in events(c, job["id"])]:
            assert time.monotonic() < cancelled_at + 90, "the step was not stopped"
            time.sleep(0.2)
        took = time.monotonic() - cancelled_at
        shown = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert 9 <= took <= 20, (
        took
    )  # the grace, a pass of the loop, SIGKILL; not the renewal's join bound (31 s)
    assert shown["status"] == "cancelled" and shown["phase"] is None, shown
    assert not trainers(str(out))
    with session_scope(stack.settings.db_url) as s:
        record = s.get(Job, job["id"])
        assert record is not None and record.lease_owner is None  # the worker let go of it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_step_that_stalls_every_time_fails_with_the_reason(
    stack: Stack, worker: Callable[..., Any], tmp_path: Path
) -> None:
    source = ops.extensions_dir() / ops.OP_NAMES["ShareMemCommBuilder"]
    extensions = tmp_path / "torch_extensions"
    shutil.copytree(source, extensions / source.name, ignore=shutil.ignore_patterns(ops.BATON))
    baton = extensions / source.name / ops.BATON
    # this cache's record says the op builds in 0.5 s, so its phase may go 4 s (the floor) without progress
    (extensions / ops.BUILD_TIMES).write_text(json.dumps({source.name: 0.5}))
    holder = subprocess.Popen(  # creates the baton, keeps it open, says 'held' and sleeps 900 s
        [sys.executable, str(HOLD_FILE), str(baton), "held", "900"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        # a build of the op that never ends, by a process outside this project's lock
        worker(TORCH_EXTENSIONS_DIR=str(extensions), RLHF_PREBUILD_OPS="false")
        with stack.client(stack.key("stuck")) as c:
            job = c.post("/v1/fine_tuning/jobs", json=BODY).json()
            done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=180)
            said = events(c, job["id"])
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert done["status"] == "failed", done
    error = done["error"]["message"]
    assert "stalled while building DeepSpeed ops" in error and "(the last of 2 attempts)" in error, error
    stalled = [e["message"] for e in said if e["data"]["event_type"] == "step_stalled"]
    assert len(stalled) == 2 and all("stalled while building DeepSpeed ops" in m for m in stalled), stalled
    print("\n".join(e["message"] for e in said))
    with session_scope(stack.settings.db_url) as s:
        record = s.get(Job, job["id"])
        assert record is not None and record.started_at and record.finished_at
        billed = sum(
            r.seconds for r in s.scalars(select(CostInterval).where(CostInterval.job_id == job["id"]))
        )
        span = (record.finished_at - record.started_at).total_seconds()
    assert billed <= span + 1.0, (billed, span)
    assert not trainers(str(_output_dir(stack, job["id"])))  # nothing of it goes on


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_builds_its_ops_past_a_killed_builds_lock_before_it_takes_a_job(
    stack: Stack, worker: Callable[..., Any], tmp_path: Path
) -> None:
    extensions = tmp_path / "torch_extensions"
    for name in ops.CPU_OPS:  # this machine's built ops, as a worker image might carry them …
        source = ops.extensions_dir() / ops.OP_NAMES[name]
        shutil.copytree(source, extensions / source.name, ignore=shutil.ignore_patterns(ops.BATON))
    baton = extensions / ops.OP_NAMES["CPUAdamBuilder"] / ops.BATON
    baton.touch()  # … with the lock a build killed halfway left (a worker killed while it prebuilt)
    w = worker(TORCH_EXTENSIONS_DIR=str(extensions))  # RLHF_PREBUILD_OPS is on by default
    with stack.client(stack.key("prebuilt")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=BODY).json()
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=180)
    assert done["status"] == "succeeded", done
    assert not baton.exists()
    log = w.log.read_text()
    assert "removed the build lock a killed build left behind" in log, log[-3000:]
    ready, taking = log.index("DeepSpeed's ops ready"), log.index("ready: taking jobs")
    assert ready < taking < log.index("rlhf.train_job["), log[-3000:]  # built before the worker took a job
