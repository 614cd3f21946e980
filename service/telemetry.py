"""Prometheus metrics, read from the database of record at scrape time (so every API replica agrees)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import Job, JobEvent
from service.jobs.states import ACTIVE, TERMINAL


def render(session: Session) -> tuple[bytes, str]:
    reg = CollectorRegistry()
    by_status = Gauge("rlhf_jobs", "fine-tuning jobs by status", ["status"], registry=reg)
    counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    for status in (*ACTIVE, *TERMINAL):
        by_status.labels(status).set(counts.get(status, 0))
    Gauge("rlhf_queue_depth", "jobs waiting for a training worker", registry=reg).set(counts.get("queued", 0))
    cost = Gauge("rlhf_cost_usd", "accrued cost of all jobs", registry=reg)
    cost.set(float(session.scalar(select(func.coalesce(func.sum(Job.accrued_usd), 0.0))) or 0.0))
    gpu = Gauge("rlhf_gpu_seconds", "GPU (or CPU process) seconds used by all jobs", registry=reg)
    gpu.set(float(session.scalar(select(func.coalesce(func.sum(Job.gpu_seconds), 0.0))) or 0.0))
    durations = Gauge("rlhf_step_seconds_last", "duration of the most recently finished run of each step", ["step"],
                      registry=reg)  # fmt: skip
    for step in (1, 2, 3):
        e = session.scalar(select(JobEvent).where(JobEvent.type == "step_succeeded", JobEvent.step == step)
                           .order_by(JobEvent.seq.desc()).limit(1))  # fmt: skip
        if e is not None and e.data and isinstance(e.data.get("seconds"), int | float):
            durations.labels(str(step)).set(float(e.data["seconds"]))
    return generate_latest(reg), CONTENT_TYPE_LATEST
