"""Nothing lost: a killed worker, a wiped broker, redeliveries and duplicates.

On PostgreSQL + Redis + Celery.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from sqlalchemy import select

from service.db.models import CostInterval, Job
from service.db.session import session_scope
from service.queue import enqueue_training
from tests.service.conftest import SMALL_SFT, Stack, events, wait_for, wait_for_training

TWO_STEPS = {
    "model": "tiny-opt-xs",
    "reward_model": "tiny-opt-xs",
    "preset": "tiny",
    "steps": [1, 2],
    "config": {
        "sft": {"max_steps": 30, "checkpoint_interval": 0},
        "reward": {"max_steps": 400, "checkpoint_interval": 20},
    },
}


def _kill_worker_and_its_step(worker: subprocess.Popen[bytes], output_dir: str) -> None:
    """What a machine failure does: the worker and the step it runs die at once, nothing cleans up."""
    os.killpg(worker.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", output_dir], check=False)
    worker.wait()


def test_killed_worker_during_step_2_resumes_from_its_checkpoint(
    make_stack: Callable[..., Stack],
    new_pg: Callable[[], str],
    new_redis: Callable[[], str],
    start_worker: Callable[..., Any],
) -> None:
    stack = make_stack(database_url=new_pg(), redis_url=new_redis())
    worker = start_worker(stack)
    with stack.client(stack.key("recovery")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=TWO_STEPS).json()
        url = f"/v1/fine_tuning/jobs/{job['id']}"
        deadline = time.monotonic() + 200
        while not any(ck["step"] == 2 for ck in c.get(f"{url}/checkpoints").json()["data"]):
            assert time.monotonic() < deadline, c.get(url).json()
            time.sleep(0.3)
        with session_scope(stack.settings.db_url) as s:
            output_dir = s.get(Job, job["id"]).output_dir  # type: ignore[union-attr]
        _kill_worker_and_its_step(worker, output_dir)
        assert c.get(url).json()["status"] == "running"  # as far as anyone knows
        start_worker(stack)  # its sweeper finds the job once the dead worker's lease runs out
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=240)
        assert done["status"] == "succeeded", done
        msgs = [e["message"] for e in events(c, job["id"])]
        resumed = [m for m in msgs if "step 2 (reward model): resuming at step" in m]
        assert resumed and int(resumed[0].split("resuming at step ")[1].split()[0]) > 0
        assert any("stopped reporting" in m for m in msgs)
        with session_scope(stack.settings.db_url) as s:
            rows = s.scalars(select(CostInterval).where(CostInterval.job_id == job["id"])).all()
            record = s.get(Job, job["id"])
            assert record is not None and record.attempts == 2
        assert len({(r.step, r.attempt, r.interval) for r in rows}) == len(rows)
        assert done["cost"]["accrued_usd"] == pytest.approx(
            sum(r.usd for r in rows), abs=1e-6
        )  # shown to 6 places


def test_worker_sigterm_checkpoints_and_requeues(
    make_stack: Callable[..., Stack],
    new_pg: Callable[[], str],
    new_redis: Callable[[], str],
    start_worker: Callable[..., Any],
) -> None:
    """A deploy stops the worker (SIGTERM): the running step checkpoints, the job is queued again, and
    the next worker resumes it from that checkpoint."""
    stack = make_stack(database_url=new_pg(), redis_url=new_redis())
    worker = start_worker(stack)
    body = SMALL_SFT | {"config": {"sft": {"max_steps": 400, "checkpoint_interval": 0, "eval_max_rows": 16}}}
    with stack.client(stack.key("deploy")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        url = f"/v1/fine_tuning/jobs/{job['id']}"
        wait_for_training(c, job["id"])
        os.kill(worker.pid, signal.SIGTERM)  # Celery's warm shutdown
        assert worker.wait(timeout=90) == 0
        requeued = c.get(url).json()
        assert requeued["status"] == "queued", requeued
        ckpts = c.get(f"{url}/checkpoints").json()["data"]
        assert len(ckpts) == 1
        at = ckpts[0]["step_number"]
        start_worker(stack)
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=150)
        assert done["status"] == "succeeded", done
        msgs = [e["message"] for e in events(c, job["id"])]
        assert any("worker shutting down" in m for m in msgs)
        assert any(f"resuming at step {at}" in m for m in msgs)


def test_job_survives_a_wiped_broker(
    make_stack: Callable[..., Stack],
    new_pg: Callable[[], str],
    new_redis: Callable[[], str],
    start_worker: Callable[..., Any],
) -> None:
    """The broker loses the message (FLUSHDB of its database, as FLUSHALL would): the sweeper re-sends it."""
    broker = new_redis()
    stack = make_stack(database_url=new_pg(), redis_url=broker)
    with stack.client(stack.key("flush")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()
        r = redis.Redis.from_url(broker)
        assert r.llen("train") == 1
        r.flushdb()
        start_worker(stack)
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=150)
        assert done["status"] == "succeeded", done


def test_redelivery_and_duplicates_never_run_a_job_twice(
    make_stack: Callable[..., Stack],
    new_pg: Callable[[], str],
    new_redis: Callable[[], str],
    start_worker: Callable[..., Any],
) -> None:
    """visibility_timeout 5 s and a ≥ 30 s job: Redis hands the unacked task to the second worker; the
    same job is also enqueued twice. One trainer runs it; the others see the lease and acknowledge."""
    stack = make_stack(database_url=new_pg(), redis_url=new_redis(), visibility_timeout_s=5)
    start_worker(stack)
    start_worker(stack, sweeper=False)
    body = SMALL_SFT | {"config": {"sft": {"max_steps": 500, "checkpoint_interval": 0, "eval_max_rows": 16}}}
    with stack.client(stack.key("dup")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=body).json()
        enqueue_training(job["id"], stack.settings)
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=200)
        assert done["status"] == "succeeded", done
        evs = events(c, job["id"])
    assert [e["data"]["event_type"] for e in evs].count("job_started") == 1
    assert [e["data"]["event_type"] for e in evs].count("step_started") == 1
    started = next(e for e in evs if e["data"]["event_type"] == "job_started")["created_at"]
    finished = next(e for e in evs if e["data"]["event_type"] == "job_succeeded")["created_at"]
    assert finished - started >= 10  # long enough for the 5 s visibility timeout to redeliver
    with session_scope(stack.settings.db_url) as s:
        assert s.get(Job, job["id"]).attempts == 1  # type: ignore[union-attr]
