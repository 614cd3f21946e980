"""Chaos drill (issue 17 item 5): a real API server, PostgreSQL, Redis and a separate training worker;
the worker's whole process group is SIGKILLed (a node dying) at random moments of a 3-step job, K
times, and a new worker started each time. The job must end succeeded with no human action; each
step's metric series has no duplicate and no gap, in the run folder and in the database; cost rows
are unique; never two trainers at once; and the work lost per kill is at most one checkpoint interval
(reported). `make test` runs 2 kills; `make chaos` runs RLHF_CHAOS_KILLS (default 6) and also
restarts PostgreSQL (its connections cut for 3 s through the proxy of test_outages) and Redis (every
client connection closed and the stack's database emptied, as a restart without persistence does)
mid-job.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from rlhf_engine.stages.records import read_jsonl
from service.db.models import CostInterval, Job, JobMetric
from service.db.session import session_scope
from tests.service.conftest import Stack, wait_for
from tests.service.test_one_trainer import TrainerCount, trainers
from tests.service.test_outages import Proxy

INTERVALS = {"step1_sft": 20, "step2_reward": 20, "step3_rlhf": 5}
BODY = {
    "model": "tiny-opt-xs",
    "reward_model": "tiny-opt-xs",
    "preset": "tiny",
    "config": {
        "sft": {
            "max_steps": 160,
            "checkpoint_interval": INTERVALS["step1_sft"],
            "keep_checkpoints": 2,
            "eval_max_rows": 16,
        },
        "reward": {
            "max_steps": 120,
            "checkpoint_interval": INTERVALS["step2_reward"],
            "keep_checkpoints": 2,
            "eval_max_rows": 32,
        },
        "ppo": {
            "max_steps": 20,
            "checkpoint_interval": INTERVALS["step3_rlhf"],
            "keep_checkpoints": 2,
            "eval_max_rows": 8,
        },
    },
}
TOTALS = {"step1_sft": 160, "step2_reward": 120, "step3_rlhf": 20}
KILLS = int(os.environ.get("RLHF_CHAOS_KILLS", "2"))


@pytest.fixture
def workers(start_worker: Callable[..., subprocess.Popen[bytes]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)


def _last_step(step_dir: Path) -> int:
    path = step_dir / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    return int(rows[-1]["step"]) if rows else 0


def _running_step(out: Path) -> Path | None:
    """The step folder being trained now (the newest one with metrics and no summary)."""
    for name in ("step3_rlhf", "step2_reward", "step1_sft"):
        d = out / name
        if (d / "metrics.jsonl").is_file() and not (d / "summary.json").exists():
            return d
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_job_survives_random_node_deaths(
    make_stack: Callable[..., Stack],
    new_pg: Callable[[], str],
    new_redis: Callable[[], str],
    start_worker: Callable[..., Any],
    workers: list[subprocess.Popen[bytes]],
) -> None:
    proxy = Proxy()
    proxy.up()
    db = new_pg().replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    stack = make_stack(database_url=db, redis_url=new_redis())
    rng = random.Random(int(os.environ.get("RLHF_CHAOS_SEED", "20231201")))
    workers.append(start_worker(stack))
    lost: list[tuple[str, int]] = []  # (step, optimizer steps redone) per kill
    with stack.client(stack.key("chaos")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=BODY).json()
        with session_scope(stack.settings.db_url) as s:
            out = Path(s.get(Job, job["id"]).output_dir)  # type: ignore[union-attr]
        count = TrainerCount(str(out))
        # kill k lands in step k mod 3 (or the one running by then), at a random point after its first
        # checkpoint
        order = list(TOTALS)
        for k in range(KILLS):
            target = k % 3
            at = {
                name: INTERVALS[name] + rng.randint(0, INTERVALS[name]) for name in order
            }  # this kill's moment
            deadline = time.monotonic() + 300
            while True:
                assert time.monotonic() < deadline, c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                step_dir = _running_step(out)
                if (
                    step_dir is not None
                    and order.index(step_dir.name) >= target
                    and trainers(str(out))
                    and _last_step(step_dir) >= at[step_dir.name]
                ):
                    break
                time.sleep(0.2)
            before, resumes = _last_step(step_dir), len(_resumes(step_dir))
            os.killpg(workers[-1].pid, signal.SIGKILL)  # the worker and everything in its group: a node dying
            workers[-1].wait()
            deadline = time.monotonic() + 60
            while trainers(str(out)):  # the step notices its worker is gone, checkpoints and leaves
                assert time.monotonic() < deadline, "the orphaned step is still training"
                time.sleep(0.1)
            if os.environ.get("RLHF_CHAOS_KILLS") and k % 2 == 1:  # `make chaos`: the database restarts too
                proxy.down()
                time.sleep(3)  # the outage itself (PostgreSQL away for 3 s), not a wait for something
                proxy.up()
            if os.environ.get("RLHF_CHAOS_KILLS") and k % 2 == 0:  # … and Redis (no persistence: queue lost)
                import redis

                r = redis.Redis.from_url(stack.settings.redis_url)
                r.flushdb()
                r.client_kill_filter(_type="normal", skipme=True)
            workers.append(start_worker(stack))
            resumed = _wait_resumed(step_dir, resumes, before)
            lost.append((step_dir.name, max(0, before - resumed)))  # the orphan may checkpoint one step later
        done = wait_for(c, job["id"], ("succeeded", "failed"), timeout=600)
        assert done["status"] == "succeeded", done
        assert count.close() == 1  # never two trainers at once
    print("work redone per kill (optimizer steps):", lost)
    for name, redone in lost:
        assert 0 <= redone <= INTERVALS[name], (name, redone)  # at most one checkpoint interval
    with session_scope(stack.settings.db_url) as s:
        for name, total in TOTALS.items():
            series = [m["step"] for m in read_jsonl(out / name / "metrics.jsonl")]
            assert series == list(range(1, total + 1)), (name, series)
        rows = s.execute(
            select(JobMetric.step, JobMetric.global_step).where(JobMetric.job_id == job["id"])
        ).all()
        for step, total in zip((1, 2, 3), TOTALS.values(), strict=True):
            assert sorted(g for st, g in rows if st == step) == list(range(1, total + 1)), step
        costs = s.scalars(select(CostInterval).where(CostInterval.job_id == job["id"])).all()
        assert len({(r.step, r.attempt, r.interval) for r in costs}) == len(costs)
        assert s.get(Job, job["id"]).attempts == KILLS + 1  # type: ignore[union-attr]
    proxy.down()


def _resumes(step_dir: Path) -> list[int]:
    """The steps the step resumed at, one per `resuming at step N` event."""
    path = step_dir / "events.jsonl"
    events = read_jsonl(path) if path.is_file() else []
    return [
        int(e["message"].split("resuming at step ", 1)[1].split()[0])
        for e in events
        if e["type"] == "step_started" and "resuming at step" in e["message"]
    ]


def _wait_resumed(step_dir: Path, resumes: int, before: int, timeout: float = 120) -> int:
    """Where the next attempt resumed the killed step (its first `resuming at step N` after the kill)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _resumes(step_dir)
        if len(found) > resumes:
            return found[resumes]
        time.sleep(0.2)
    raise AssertionError(
        f"{step_dir.name} did not resume within {timeout:.0f} s (last step before the kill {before})"
    )
