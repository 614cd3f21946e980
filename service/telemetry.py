"""Prometheus metrics, read from the database of record at scrape time (so every API replica agrees)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.models import Job, JobEvent, JobMetric
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
    durations = Gauge(
        "rlhf_step_seconds_last",
        "duration of the most recently finished run of each step",
        ["step"],
        registry=reg,
    )
    for step in (1, 2, 3):
        e = session.scalar(
            select(JobEvent)
            .where(JobEvent.type == "step_succeeded", JobEvent.step == step)
            .order_by(JobEvent.seq.desc())
            .limit(1)
        )
        if e is not None and e.data and isinstance(e.data.get("seconds"), int | float):
            durations.labels(str(step)).set(float(e.data["seconds"]))
    _running(session, reg)
    return generate_latest(reg), CONTENT_TYPE_LATEST


def _running(session: Session, reg: CollectorRegistry) -> None:
    """Per running job, from its newest metric point: the step it is in, how far, how fast, and (step 3)
    the reward and KL — what an operator graphs to see a run stall or diverge."""
    labels = ["job", "tenant", "step"]
    step = Gauge("rlhf_job_step", "the RLHF step (1-3) a running job is in", ["job", "tenant"], registry=reg)
    progress = Gauge(
        "rlhf_job_progress", "share of a running job done (0-1)", ["job", "tenant"], registry=reg
    )
    gauges = {
        key: Gauge(f"rlhf_job_{key}", help_, labels, registry=reg)
        for key, help_ in (
            ("global_step", "optimizer (or PPO) steps done in the running step"),
            ("samples_per_s", "training samples per second at the newest step"),
            ("loss", "training loss at the newest step"),
            ("reward_mean", "mean reward of the newest PPO step (step 3)"),
            ("kl_to_ref", "KL to the reference at the newest PPO step (step 3)"),
        )
    }
    newest = (
        select(func.max(JobMetric.id))
        .join(Job, Job.id == JobMetric.job_id)
        .where(Job.status == "running")
        .group_by(JobMetric.job_id)
    )
    points = {m.job_id: m for m in session.scalars(select(JobMetric).where(JobMetric.id.in_(newest)))}
    for job in session.scalars(select(Job).where(Job.status == "running")):
        step.labels(job.id, job.tenant_id).set(job.current_step or 0)
        progress.labels(job.id, job.tenant_id).set(job.progress)
        m = points.get(job.id)
        if m is None:
            continue
        where = (job.id, job.tenant_id, str(m.step))
        gauges["global_step"].labels(*where).set(m.global_step)
        for key in ("samples_per_s", "loss", "reward_mean", "kl_to_ref"):
            value = (m.values or {}).get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                gauges[key].labels(*where).set(float(value))
