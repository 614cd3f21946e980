"""The job side of evals: a job's eval runs report to the job (events, checkpoint metrics), and the best
checkpoint by an eval can be promoted to the job's model. (Creating the runs: service/services/evals.py,
called by the training worker as checkpoints and the final model appear.)"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import EvalRun, FineTunedModel, Job, JobCheckpoint
from service.errors import InvalidRequestError, NotFoundError, WrongStateError
from service.jobs.lifecycle import add_event
from service.jobs.queries import get_job
from service.services import checkpoints
from service.services import evals as evals_svc


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


def report_to_job(session: Session, run: EvalRun, eval_name: str) -> None:
    """A job's eval run finished: its pass rates in the job's events and on the checkpoint it graded
    (`eval:<eval>:<criterion>` among the checkpoint's metrics)."""
    rates = evals_svc.pass_rates(run)
    label = eval_name or run.eval_id
    add_event(
        session=session,
        job=str(run.job_id),
        type_="eval_completed",
        message=f"eval {label} on {run.model}: {rates['pass_rate']:.0%} passed",
        data={"eval_id": run.eval_id, "run_id": run.id, "model": run.model, "pass_rates": rates},
        source_key=f"eval:{run.id}",
    )
    found = (
        checkpoints._find(session, run.model or "")
        if run.model and checkpoints.is_checkpoint(run.model)
        else None
    )
    if found is None and run.model:  # the final model: its step's final checkpoint row
        job = session.get(Job, run.job_id)
        if job is not None and job.fine_tuned_model == run.model:
            final = session.scalar(
                select(JobCheckpoint)
                .where(JobCheckpoint.job_id == job.id, JobCheckpoint.step == job.steps[-1])
                .order_by(JobCheckpoint.global_step.desc())
            )
            found = (job, final) if final is not None else None
    if found is not None:
        ckpt = found[1]
        ckpt.metrics = (ckpt.metrics or {}) | {f"eval:{label}:{k}": round(v, 6) for k, v in rates.items()}


def promote(*, session: Session, tenant: str, job_id: str, body: dict[str, Any]) -> tuple[Any, str]:
    """Make one of a finished job's checkpoints its model: the one named (`checkpoint`), or the best by
    an eval's pass rate (`eval_id`, overall or `criterion`) among the job's completed runs of it. The job's
    `fine_tuned_model` id then serves that checkpoint's weights; the job's events say which and why.
    (job, the checkpoint model id)."""
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if job.status != "succeeded" or not job.fine_tuned_model:
        raise WrongStateError(f"job {job_id} is {job.status}; only a succeeded job's model can be replaced")
    why: str
    if body.get("checkpoint"):
        name = str(body["checkpoint"])
        checkpoints.own(session, tenant, name, "checkpoint")
        why = "named"
    else:
        eval_id = body.get("eval_id")
        if not eval_id:
            raise _bad("checkpoint", "name a checkpoint, or an eval_id (and criterion) to pick the best by")
        criterion = body.get("criterion") or "pass_rate"
        runs = list(
            session.scalars(
                select(EvalRun).where(
                    EvalRun.job_id == job.id, EvalRun.eval_id == eval_id, EvalRun.status == "completed"
                )
            )
        )
        scored = [
            (evals_svc.pass_rates(r).get(criterion), r)
            for r in runs
            if r.model and checkpoints.is_checkpoint(r.model)
        ]
        scored = [(v, r) for v, r in scored if v is not None]
        if not scored:
            raise _bad(
                "eval_id",
                f"no completed run of eval {eval_id} on a checkpoint of job {job_id}"
                + ("" if not runs else f" with a criterion {criterion!r}"),
            )
        best, run = max(scored, key=lambda x: (x[0], x[1].created_at))  # ties: the later checkpoint
        name = str(run.model)
        why = f"best {criterion} of eval {eval_id}: {best:.0%}"
    path = checkpoints.model_folder(session, tenant, name, "checkpoint")
    model = session.get(FineTunedModel, job.fine_tuned_model)
    if model is None:
        raise NotFoundError(f"job {job_id} has no model to replace (deleted?)", param="job_id")
    request = dict(job.request or {})
    request.setdefault("_model_path", model.path)  # the step's own final model, kept on record
    job.request = request
    model.path = str(path)
    add_event(
        session=session,
        job=job,
        type_="model_promoted",
        message=f"{job.fine_tuned_model} now serves {name} ({why})",
        data={"checkpoint": name, "reason": why},
    )
    return job, name
