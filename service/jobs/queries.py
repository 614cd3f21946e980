"""Reading jobs and what they wrote: the job object, its events, checkpoints, metrics and rollouts,
and the live stream of them. Nothing here writes.

Every list pages one way (OpenAI's): `after` is the `id` of the last item of the previous page,
`limit` the page size; the answer carries `data`, `has_more`, `first_id` and `last_id`. Jobs,
events and checkpoints come newest first; metrics and rollouts (time series) oldest first.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf_engine.stages import phase as phases
from service.db.models import Job, JobCheckpoint, JobEvent, JobMetric
from service.errors import NotFoundError
from service.jobs import results
from service.jobs.states import TERMINAL
from service.pagination import anchor_of, cut, newest_first, paged
from service.schemas import (
    CheckpointList,
    CheckpointObject,
    Cost,
    EventList,
    EventObject,
    JobError,
    JobList,
    JobObject,
    JobPhase,
    MetricList,
    MetricPoint,
    RolloutList,
)
from service.services import checkpoints


def get_job(*, session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant:
        raise NotFoundError(f"no fine-tuning job {job_id}", param="fine_tuning_job_id")
    return job


def list_jobs(
    *, session: Session, tenant: str, after: str | None, limit: int, metadata: dict[str, str] | None = None
) -> JobList:
    """The tenant's jobs, newest first; with `metadata`, only those whose metadata holds every pair."""
    if metadata:
        q = select(Job).where(Job.tenant_id == tenant).order_by(Job.created_at.desc(), Job.id.desc())
        matching = [
            j
            for j in session.scalars(q)
            if all((j.job_metadata or {}).get(k) == v for k, v in metadata.items())
        ]
        found, more = cut(matching, after=after, limit=limit, id_of=lambda j: j.id, what="fine-tuning job")
        return paged(JobList, [to_object(j) for j in found], more)
    rows, more = newest_first(
        session,
        select(Job).where(Job.tenant_id == tenant),
        Job,
        after=after,
        find=lambda job_id: get_job(session=session, tenant=tenant, job_id=job_id),
        what="fine-tuning job",
        limit=limit,
    )
    return paged(JobList, [to_object(j) for j in rows], more)


def _ts(d: datetime | None) -> int | None:
    return int(d.timestamp()) if d else None


def phase_object(phase: dict[str, Any], now: float | None = None) -> JobPhase:
    """The stored phase (workers/watch.py `Seen.public`) with its time so far."""
    now = time.time() if now is None else now
    since = float(phase.get("since") or now)
    return JobPhase(
        name=str(phase.get("name", "")),
        description=phases.describe(phase, now=now),
        step=phase.get("step"),
        started_at=int(since),
        elapsed_s=round(max(0.0, now - since), 1),
        typical_s=phase.get("typical_s"),
        bound_s=float(phase.get("bound_s") or 0.0),
    )


def to_object(job: Job) -> JobObject:
    req = job.request or {}
    # as given until the job starts, then the values it runs with (OpenAI resolves "auto" so)
    started = job.status not in ("validating_files", "queued") or job.started_at is not None
    hp = req.get("_resolved_hyperparameters") if started else None
    hp = hp or req.get("_hyperparameters", {})
    method_obj: dict[str, Any] = {"type": job.method, job.method: {"hyperparameters": hp}}
    grader = ((req.get("method") or {}).get("reinforcement") or {}).get("grader")
    if job.method == "reinforcement" and grader:
        method_obj["reinforcement"]["grader"] = grader
    return JobObject(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        finished_at=_ts(job.finished_at),
        estimated_finish=_ts(job.estimated_finish) if job.status in ("queued", "running") else None,
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.tenant_id,
        status=job.status,
        training_file=job.training_file,
        validation_file=job.validation_file,
        hyperparameters=hp,
        method=method_obj,
        result_files=list(job.result_files or []),
        trained_tokens=job.trained_tokens if job.status == "succeeded" else None,
        error=JobError(**job.error) if job.error else None,
        seed=job.seed,
        suffix=job.suffix,
        metadata=job.job_metadata,
        integrations=req.get("integrations") or [],
        evals=req.get("evals") or [],
        reward_model=job.reward_model,
        steps=job.steps,
        current_step=job.current_step,
        step_status=job.step_status,
        progress=round(job.progress, 4),
        phase=phase_object(job.phase) if job.status == "running" and job.phase else None,
        cost=Cost(
            estimated_usd=round(job.estimated_usd, 6),
            accrued_usd=round(job.accrued_usd, 6),
            gpu_seconds=round(job.gpu_seconds, 3),
            max_cost_usd=job.max_cost_usd,
            judge_requests=int((req.get("_judges") or {}).get("requests", 0)),
            judge_tokens=int((req.get("_judges") or {}).get("tokens", 0)),
        ),
        num_gpus=job.num_gpus,
        nodes=job.nodes,
        gpus_per_node=job.num_gpus // max(job.nodes, 1),
        gpu_type=job.gpu_type,
    )


# ---------------------------------------------------------------------------- events


def list_events(*, session: Session, tenant: str, job_id: str, after: str | None, limit: int) -> EventList:
    get_job(session=session, tenant=tenant, job_id=job_id)
    q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())

    def find(event_id: str) -> JobEvent:
        found = session.scalar(select(JobEvent).where(JobEvent.id == event_id, JobEvent.job_id == job_id))
        if found is None:
            raise NotFoundError(f"no event {event_id} in job {job_id}")
        return found

    anchor = anchor_of(after, find, f"event of job {job_id}:")
    if anchor is not None:
        q = q.where(JobEvent.seq < anchor.seq)
    rows = list(session.scalars(q.limit(limit + 1)))
    return paged(EventList, [event_object(e) for e in rows[:limit]], len(rows) > limit)


def events_since(*, session: Session, job_id: str, seq: int) -> list[JobEvent]:
    """Events newer than `seq`, oldest first (for live streams)."""
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > seq).order_by(JobEvent.seq)
    return list(session.scalars(q))


# the steps' and older rows' level names → OpenAI's (the SDK's FineTuningJobEvent.level)
LEVELS: dict[str, Literal["info", "warn", "error"]] = {"info": "info", "warning": "warn", "warn": "warn"}


def event_object(e: JobEvent) -> EventObject:
    if e.type == "metrics":  # OpenAI's: data is the metric point (its `step` the training step)
        kind: Literal["message", "metrics"] = "metrics"
        data = dict(e.data or {}) | {"event_type": "metrics"}  # (every event's data names its type)
    else:
        kind = "message"
        data = dict(e.data or {}) | ({"step": e.step} if e.step is not None else {}) | {"event_type": e.type}
    return EventObject(
        id=e.id,
        created_at=int(e.created_at.timestamp()),
        level=LEVELS.get(e.level, "error"),
        message=e.message,
        type=kind,
        data=data,
    )


async def follow(
    *, db_url: str, job_id: str, metrics: bool = False, poll_s: float = 0.5
) -> AsyncIterator[EventObject | MetricPoint | JobObject]:
    """Every event (and, with `metrics`, every metric point) of a job from the start, then live ones
    until the job ends or pauses, what was written as it ended, and last the job itself. Shared by
    REST's `events?stream=true` and gRPC's WatchJob; the caller has checked the job is the tenant's."""
    import asyncio

    from service.db.session import session_scope

    seq, metric_id = 0, 0

    def poll() -> tuple[list[EventObject | MetricPoint], bool, JobObject | None]:
        nonlocal seq, metric_id
        with session_scope(db_url) as s:
            events = events_since(session=s, job_id=job_id, seq=seq)
            points = metrics_since(session=s, job_id=job_id, after_id=metric_id) if metrics else []
            seq = events[-1].seq if events else seq
            metric_id = points[-1].id if points else metric_id
            job = s.get(Job, job_id)
            items: list[EventObject | MetricPoint] = [event_object(e) for e in events] + list(points)
            if job is None:
                return items, True, None
            return items, job.status in TERMINAL or job.status == "paused", to_object(job)

    while True:  # bounded: the job ends or pauses, or the client leaves
        items, ended, job = await asyncio.to_thread(poll)
        for item in items:
            yield item
        if ended:
            items, _, job = await asyncio.to_thread(poll)  # what was written as it ended
            for item in items:
                yield item
            if job is not None:
                yield job
            return
        await asyncio.sleep(poll_s)


# ---------------------------------------------------------------------------- checkpoints, metrics, rollouts


def list_checkpoints(
    *, session: Session, tenant: str, job_id: str, after: str | None, limit: int
) -> CheckpointList:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    q = (
        select(JobCheckpoint)
        .where(JobCheckpoint.job_id == job_id)
        .order_by(JobCheckpoint.step.desc(), JobCheckpoint.global_step.desc())
    )
    rows, more = cut(
        list(session.scalars(q)), after=after, limit=limit, id_of=lambda c: c.id, what="checkpoint"
    )
    return paged(CheckpointList, [checkpoint_object(c, job) for c in rows], more)


def checkpoint_object(c: JobCheckpoint, job: Job) -> CheckpointObject:
    name = checkpoints.model_id(job, c)
    return CheckpointObject(
        id=c.id,
        created_at=int(c.created_at.timestamp()),
        fine_tuned_model_checkpoint=name,
        fine_tuning_job_id=job.id,
        # the SDK's names first, then ours under their own names (loss, reward_mean, final, …)
        metrics=results.sdk_metrics(c.metrics or {}, global_step=c.global_step)
        | {k: v for k, v in (c.metrics or {}).items() if k != "step"},
        step_number=c.global_step,
        step=c.step,
    )


def _point(m: JobMetric) -> MetricPoint:
    return MetricPoint(id=m.id, step=m.step, global_step=m.global_step, time=m.time, values=m.values)


def list_metrics(
    *, session: Session, tenant: str, job_id: str, step: int | None, after: int | None, limit: int
) -> MetricList:
    get_job(session=session, tenant=tenant, job_id=job_id)
    q = (
        select(JobMetric)
        .where(JobMetric.job_id == job_id, JobMetric.id > (after or 0))
        .order_by(JobMetric.id)
    )
    if step is not None:
        q = q.where(JobMetric.step == step)
    rows = list(session.scalars(q.limit(limit + 1)))
    return paged(MetricList, [_point(m) for m in rows[:limit]], len(rows) > limit)


def metrics_since(*, session: Session, job_id: str, after_id: int) -> list[MetricPoint]:
    """Metrics newer than `after_id`, oldest first (for live streams)."""
    q = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.id > after_id).order_by(JobMetric.id)
    return [_point(m) for m in session.scalars(q)]


def list_rollouts(
    *, session: Session, tenant: str, job_id: str, after: int | None, limit: int
) -> RolloutList:
    """Sampled PPO experiences, oldest first; a rollout's `id` is its line in rollouts.jsonl (from 1)."""
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    path = Path(job.output_dir) / "step3_rlhf" / "rollouts.jsonl"
    if not path.is_file():
        return paged(RolloutList, [], False)
    out: list[dict[str, Any]] = []
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if line_no <= (after or 0):
                continue
            if len(out) > limit:
                break
            try:
                out.append(json.loads(line) | {"id": line_no})
            except ValueError:
                continue  # a line being written
    return paged(RolloutList, out[:limit], len(out) > limit)
