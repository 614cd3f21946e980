"""The only code that changes a job's status (the API's, the worker's and the sweeper's moves alike).

Every move is one guarded `UPDATE jobs SET status = <to> … WHERE id = … AND status IN (<from>)`
(`states.TRANSITIONS`), plus the lease owner's id where the worker moves it. Two actors racing for
one job (a cancel and the worker's last write, a claim and the sweeper, two claims) cannot both
win: the database applies one UPDATE, and the other matches no row. The loser is told — a 400 for
the API (WrongStateError), "lost" or "cancelled" for the worker — and writes nothing.

A job's history (its events) is written here with its moves, and by the worker as the job runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from service.db.models import FineTunedModel, Job, JobEvent, Tenant, utcnow
from service.errors import ConflictError, InvalidRequestError, WrongStateError
from service.jobs import states
from service.jobs.plan import make_plan
from service.jobs.queries import get_job
from service.jobs.states import FailureCode, StepOutcome, StepStatus, Transition
from service.schemas import JobCreate
from service.services import cost as costs
from service.settings import Settings


class LeaseLostError(Exception):
    """This worker no longer holds the job's lease: another worker took it, or the job was swept."""


JUDGE_TOKEN = "_judge_token"


def _judge_token(req: JobCreate) -> dict[str, str]:
    """A job whose grader prompts judge models (or embeds, for cosine similarity) gets a secret its
    training step presents to the API's internal routes (service/api/internal.py); never shown to anyone."""
    from rlhf_engine import graders

    params = req.method.reinforcement if req.method and req.method.type == "reinforcement" else None
    if params is None or params.grader is None:
        return {}
    grader = graders.parse(params.grader)
    if not grader.judges() and not grader.embeds():
        return {}
    return {JUDGE_TOKEN: secrets.token_urlsafe(32)}


def _move(session: Session, t: Transition, job_id: str, *where: ColumnElement[bool], **values: Any) -> bool:
    """Apply transition `t` to the job when its status is one of `t.source` (and `where` holds)."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(t.source), *where)
        .values(status=t.target, **values)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def _reload(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def add_event(
    *,
    session: Session,
    job: Job | str,
    type_: str,
    message: str,
    level: str = "info",
    step: int | None = None,
    data: dict[str, Any] | None = None,
    source_key: str | None = None,
    replace: bool = False,
) -> None:
    """Record an event of `job` (or of the job with that id); with a `source_key`, once: a second
    record under the same key is dropped (a worker reading a step's events.jsonl again), or with
    `replace` updates the first one's message and data (a metric point written again)."""
    job_id = job if isinstance(job, str) else job.id
    if source_key is not None:
        seen = session.scalar(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.source_key == source_key)
        )
        if seen is not None:  # recorded once, whoever records it again (a worker redoing its bookkeeping)
            if replace and (seen.data, seen.message) != (data, message):
                seen.data, seen.message = data, message
            return
    session.add(
        JobEvent(
            job_id=job_id,
            type=type_,
            message=message,
            level=level,
            step=step,
            data=data,
            source_key=source_key,
        )
    )


# ---------------------------------------------------------------------------- the API's moves


def request_hash(req: JobCreate) -> str:
    return hashlib.sha256(json.dumps(req.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create_job(
    *, session: Session, tenant: str, req: JobCreate, settings: Settings, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """(job, created). The same Idempotency-Key with the same body returns the first job."""
    digest = request_hash(req)
    if idempotency_key:
        if len(idempotency_key) > 255:
            raise InvalidRequestError("Idempotency-Key: at most 255 characters", param="Idempotency-Key")
        prior = session.scalar(
            select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == idempotency_key)
        )
        if prior is not None:
            if prior.request_hash != digest:
                raise ConflictError(
                    "Idempotency-Key was used with a different request body; use a new key",
                    param="Idempotency-Key",
                )
            return prior, False
    job_id = f"ftjob-{secrets.token_hex(12)}"
    output_dir = settings.runs_dir / tenant / job_id
    planned = make_plan(session=session, tenant=tenant, req=req, settings=settings, output_dir=output_dir)
    est_s = sum(s.seconds for s in planned.estimate)
    if settings.max_active_jobs or settings.max_queued_gpu_hours:
        from service.limits import check_job_quota

        session.execute(
            select(Tenant.id).where(Tenant.id == tenant).with_for_update()
        )  # one create at a time
        check_job_quota(
            session=session, tenant=tenant, settings=settings, gpu_hours=est_s * req.num_gpus / 3600
        )
    first = planned.plan[str(planned.steps[0])]
    job = Job(
        id=job_id,
        tenant_id=tenant,
        status=states.CREATE.target,
        method=planned.method,
        model=req.model,
        reward_model=req.reward_model,
        suffix=req.suffix,
        seed=req.seed if req.seed is not None else int(first.get("seed", 1234)),
        training_file=req.training_file,
        validation_file=req.validation_file,
        file_ids=planned.file_ids,
        request=req.model_dump(mode="json")
        | {
            "_hyperparameters": planned.hyperparameters,
            "_resolved_hyperparameters": planned.resolved_hyperparameters,
            "_memory": {str(m["step"]): m for m in planned.memory},
            "_seconds": {str(e.step): e.seconds for e in planned.estimate},  # a step's "usually"
        }
        | _judge_token(req),
        plan=planned.plan,
        job_metadata=req.metadata,
        steps=planned.steps,
        step_status={str(s): "pending" for s in planned.steps},
        num_gpus=req.num_gpus,
        nodes=req.nodes,
        gpu_type=req.gpu_type,
        max_cost_usd=req.max_cost_usd,
        estimated_usd=sum(s.usd for s in planned.estimate),
        estimated_seconds=est_s,
        output_dir=str(output_dir),
        idempotency_key=idempotency_key,
        request_hash=digest,
        estimated_finish=utcnow() + timedelta(seconds=est_s),
        enqueued_at=utcnow(),
    )
    session.add(job)
    session.flush()
    add_event(
        session=session,
        job=job,
        type_="job_created",
        message=f"job created: {planned.method}, steps {', '.join(map(str, planned.steps))}; "
        f"estimate {est_s / 60:.1f} min, ${job.estimated_usd:.2f}",
        data={"estimate": [dataclasses.asdict(s) for s in planned.estimate]},
    )
    return job, True


def submit_job(
    *, session: Session, tenant: str, req: JobCreate, settings: Settings, idempotency_key: str | None = None
) -> Job:
    """Create the job, commit it (on record before any worker looks for it), then enqueue it."""
    from service.queue import enqueue_training

    job, created = create_job(
        session=session, tenant=tenant, req=req, settings=settings, idempotency_key=idempotency_key
    )
    session.commit()
    if created:
        enqueue_training(job.id, settings)
    return job


def _refused(
    session: Session, job_id: str, verb: str, sources: tuple[states.JobStatus, ...]
) -> WrongStateError:
    status = _reload(session, job_id).status
    live = " or ".join(sources)
    already = "already " if status in states.TERMINAL else ""
    return WrongStateError(
        f"job {job_id} is {already}{status}; only a {live} job can be {verb}", param="fine_tuning_job_id"
    )


def cancel(*, session: Session, tenant: str, job_id: str) -> Job:
    get_job(session=session, tenant=tenant, job_id=job_id)
    # a running job's worker sees the status and kills its step; `control` says so to an older worker
    control = case((Job.status == "running", "cancel"), else_=None)
    if not _move(session, states.CANCEL, job_id, control=control, finished_at=utcnow()):
        raise _refused(session, job_id, "cancelled", ("queued", "running", "paused"))
    job = _reload(session, job_id)
    add_event(session=session, job=job, type_="cancelled", message="job cancelled by the user")
    return job


def pause(*, session: Session, tenant: str, job_id: str) -> Job:
    get_job(session=session, tenant=tenant, job_id=job_id)
    if _move(session, states.PAUSE_QUEUED, job_id):
        job = _reload(session, job_id)
        add_event(session=session, job=job, type_="paused", message="job paused before it started")
        return job
    # running: a request to its worker, which checkpoints the step and then moves the job (states.PAUSED)
    asked = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running")
        .values(control="pause")
        .execution_options(synchronize_session=False)
    )
    if asked.rowcount != 1:  # type: ignore[attr-defined]
        raise _refused(session, job_id, "paused", ("queued", "running"))
    job = _reload(session, job_id)
    add_event(
        session=session,
        job=job,
        type_="pause_requested",
        message="pause requested; the running step checkpoints and stops",
    )
    return job


def resume(*, session: Session, tenant: str, job_id: str, settings: Settings) -> Job:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if job.status not in states.RESUME.source:
        raise _refused(session, job_id, "resumed", states.RESUME.source)
    interval = costs.interval_usd(settings.cost_interval_s, num_gpus=job.num_gpus, gpu_type=job.gpu_type)
    if costs.budget_exhausted(
        accrued_usd=job.accrued_usd, max_cost_usd=job.max_cost_usd, interval_usd=interval
    ):
        raise WrongStateError(
            f"job {job_id} has spent ${job.accrued_usd:.6f} of its max_cost_usd ${job.max_cost_usd}; "
            "it cannot resume within its budget",
            param="max_cost_usd",
        )
    if not _move(session, states.RESUME, job_id, control=None, enqueued_at=utcnow()):
        raise _refused(session, job_id, "resumed", states.RESUME.source)
    job = _reload(session, job_id)
    add_event(
        session=session, job=job, type_="resumed", message="job resumed; it continues from its checkpoint"
    )
    return job


def resume_job(*, session: Session, tenant: str, job_id: str, settings: Settings) -> Job:
    """Resume a paused job: committed, then re-enqueued."""
    from service.queue import enqueue_training

    job = resume(session=session, tenant=tenant, job_id=job_id, settings=settings)
    session.commit()
    enqueue_training(job.id, settings)
    return job


# ---------------------------------------------------------------------------- the worker's moves


def claim(*, session: Session, job_id: str, owner: str, settings: Settings) -> Job | None:
    """Take the job's lease if nobody holds a live one; None otherwise (a duplicate delivery)."""
    now = utcnow()
    free = or_(Job.lease_owner.is_(None), Job.lease_until < now)
    won = _move(
        session,
        states.CLAIM,
        job_id,
        free,
        lease_owner=owner,
        lease_until=now + timedelta(seconds=settings.lease_s),
        heartbeat_at=now,
        attempts=Job.attempts + 1,
        started_at=func.coalesce(Job.started_at, now),
    )
    return _reload(session, job_id) if won else None


def _held(session: Session, job_id: str, owner: str, settings: Settings, **values: Any) -> Job:
    """Renew the lease (and write `values`) while `owner` holds it; LeaseLostError otherwise."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner)
        .values(lease_until=now + timedelta(seconds=settings.lease_s), heartbeat_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLostError(job_id)
    return _reload(session, job_id)


def renew(
    *,
    session: Session,
    job_id: str,
    owner: str,
    settings: Settings,
    progress: float | None = None,
    estimated_finish: Any = None,
    phase: dict[str, Any] | None = None,
) -> Job:
    """The worker's heartbeat: the lease, and the job's progress and phase when given."""
    values: dict[str, Any] = {}
    if progress is not None:
        values["progress"] = progress
    if estimated_finish is not None:
        values["estimated_finish"] = estimated_finish
    if phase is not None:
        values["phase"] = phase
    return _held(session, job_id, owner, settings, **values)


def progress_of(job: Job, step_status: dict[str, StepStatus] | None = None, running: float = 0.0) -> float:
    """The share of the job done: its succeeded steps, plus `running` (0-1) of the one running now."""
    status = job.step_status if step_status is None else step_status
    done = sum(1 for s in job.steps if status.get(str(s)) == "succeeded")
    return min((done + running) / len(job.steps), 1.0)


def set_step(
    *,
    session: Session,
    job_id: str,
    owner: str,
    settings: Settings,
    step: int,
    status: StepStatus,
    tokens: int = 0,
) -> Job:
    """One step's status (the job's own does not move): `running` makes it the current step; a
    succeeded step adds its tokens to the job's and its share to the progress."""
    job = _reload(session, job_id)
    step_status = {**job.step_status, str(step): status}
    values: dict[str, Any] = {"step_status": step_status}
    if status == "running":
        values["current_step"] = step
    if status == "succeeded":
        values["trained_tokens"] = Job.trained_tokens + tokens
        values["progress"] = progress_of(job, step_status)
    return _held(session, job_id, owner, settings, **values)


# a step's own status after an attempt that ended so (a job that succeeded already marked its steps)
_STEP_AFTER: dict[StepOutcome, StepStatus] = {
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "paused": "paused",
    "requeued": "pending",
    "lost": "pending",
    "killed": "failed",
    "stalled": "failed",
}
_FINISH: dict[StepOutcome, Transition] = {
    "succeeded": states.SUCCEED,
    "failed": states.FAIL,
    "paused": states.PAUSED,
    "requeued": states.REQUEUE,
}


def finish(
    *,
    session: Session,
    job_id: str,
    owner: str,
    outcome: StepOutcome,
    step: int | None,
    message: str = "",
    models: dict[str, Path] | None = None,
    fine_tuned_model: str | None = None,
) -> StepOutcome:
    """The worker lets go of the job, moving it by how its last step attempt ended: succeeded
    (registering `models`, ids → folders), failed, paused, or queued again for another worker.
    Returns what happened: the outcome; "cancelled" when the user cancelled first (the cancellation
    stands and nothing of the outcome is written); "lost" when another worker holds the job."""
    job = _reload(session, job_id)
    if job.lease_owner != owner:
        return "lost"
    mine = Job.lease_owner == owner
    now = utcnow()
    step_status = dict(job.step_status)
    if step is not None and outcome != "succeeded":
        step_status[str(step)] = _STEP_AFTER[outcome]
    release: dict[str, Any] = {"lease_owner": None, "lease_until": None, "control": None, "phase": None}
    code: FailureCode = "step_failed"
    by_outcome: dict[StepOutcome, dict[str, Any]] = {
        "succeeded": {
            "progress": 1.0,
            "finished_at": now,
            "current_step": None,
            "fine_tuned_model": fine_tuned_model,
        },
        "failed": {"finished_at": now, "error": {"code": code, "message": message[:2000], "param": None}},
        "requeued": {"enqueued_at": now},
    }
    t = _FINISH.get(outcome)
    values = {"step_status": step_status, **release, **by_outcome.get(outcome, {})}
    won = t is not None and _move(session, t, job_id, mine, **values)
    if not won:
        # cancelled by the user (before or while this worker ended): the cancellation stands
        if step is not None:
            step_status[str(step)] = "cancelled"
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == states.CANCEL.target, mine)
            .values(step_status=step_status, finished_at=func.coalesce(Job.finished_at, now), **release)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return "lost"
        job = _reload(session, job_id)
        add_event(
            session=session,
            job=job,
            type_="step_killed",
            message=f"step {step} stopped for the cancellation",
            step=step,
        )
        return "cancelled"
    job = _reload(session, job_id)
    if outcome == "succeeded":
        for model_id, path in (models or {}).items():
            if session.get(FineTunedModel, model_id) is None:
                session.add(
                    FineTunedModel(id=model_id, tenant_id=job.tenant_id, job_id=job.id, path=str(path))
                )
        add_event(
            session=session, job=job, type_="job_succeeded", message=f"job succeeded: {job.fine_tuned_model}"
        )
    elif outcome == "failed":
        add_event(
            session=session, job=job, type_="job_failed", level="error", message=message[:2000], step=step
        )
    elif outcome == "paused":
        why = "max_cost_usd reached" if message == "budget" else "paused by the user"
        add_event(
            session=session,
            job=job,
            type_="paused",
            message=f"job paused at a checkpoint of step {step}: {why}",
            step=step,
        )
    elif outcome == "requeued":
        add_event(
            session=session,
            job=job,
            type_="requeued",
            step=step,
            message=f"worker shutting down: step {step} checkpointed; the job is queued again",
        )
    return outcome


# ---------------------------------------------------------------------------- the sweeper's move


def sweep(*, session: Session, settings: Settings) -> list[str]:
    """Queue again the jobs that lost their worker (lease expired) or their queue message (queued
    long ago and never claimed); returns their ids, for the caller to enqueue after commit."""
    now = utcnow()
    stale = now - timedelta(seconds=max(settings.sweep_s * 2, settings.lease_s))
    lost_worker = and_(Job.status == "running", Job.lease_until < now)
    lost_message = and_(
        Job.status == "queued", Job.enqueued_at < stale, or_(Job.lease_until.is_(None), Job.lease_until < now)
    )
    out = []
    for job_id, status in session.execute(
        select(Job.id, Job.status).where(or_(lost_worker, lost_message))
    ).all():
        # the same condition again in the UPDATE: a worker that claimed the job meanwhile keeps it
        if not _move(
            session,
            states.SWEEP,
            job_id,
            or_(lost_worker, lost_message),
            lease_owner=None,
            lease_until=None,
            phase=None,
            enqueued_at=now,
        ):
            continue
        if status == "running":
            add_event(
                session=session,
                job=_reload(session, job_id),
                type_="worker_lost",
                level="warn",
                message="the job's worker stopped reporting; queued again, "
                "it resumes from its last checkpoint",
            )
        out.append(job_id)
    return out


__all__ = [
    "LeaseLostError",
    "add_event",
    "cancel",
    "claim",
    "create_job",
    "finish",
    "pause",
    "renew",
    "resume",
    "resume_job",
    "set_step",
    "submit_job",
    "sweep",
]
