"""Checkpoints as models: every checkpoint a job lists is a model id one can chat with and train from,
and its owner may share it with another tenant (OpenAI's checkpoint permissions; project id = tenant).

A checkpoint's id is its job's model id and its step, OpenAI's way: `ft:<base>:<suffix>:<job>:ckpt-step-N`
for the job's own model (its last step), `…:ckpt-step<S>-N` for an earlier step's model (a DPO job's SFT
step, an RLHF job's SFT step). The reward model's checkpoints score and are not chat models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import CheckpointShare, Job, JobCheckpoint, Tenant
from service.errors import InvalidRequestError, NotFoundError
from service.pagination import cut, paged
from service.schemas import CheckpointPermission, CheckpointPermissionList, ModelObject
from service.services.ids import job_model_id

CKPT_RE = re.compile(r"(?P<model>ft:[^:]+:[^:]*:[^:]+(?::ema|:sft)?):ckpt-step(?P<step>\d*)-(?P<gs>\d+)")


def model_id(job: Job, c: JobCheckpoint) -> str:
    """The checkpoint's model id (see the module docstring)."""
    model = job_model_id(job)
    return (
        f"{model}:ckpt-step-{c.global_step}"
        if c.step == job.steps[-1]
        else f"{model}:ckpt-step{c.step}-{c.global_step}"
    )


def is_checkpoint(name: str) -> bool:
    return CKPT_RE.fullmatch(name) is not None


def job_of(session: Session, name: str) -> Job | None:
    """The job a checkpoint model id belongs to."""
    found = _find(session, name)
    return found[0] if found is not None else None


def _find(session: Session, name: str) -> tuple[Job, JobCheckpoint] | None:
    m = CKPT_RE.fullmatch(name)
    if m is None:
        return None
    job = session.get(Job, m["model"].split(":")[3])
    if job is None:
        return None
    step = int(m["step"]) if m["step"] else job.steps[-1]
    c = session.scalar(
        select(JobCheckpoint).where(
            JobCheckpoint.job_id == job.id,
            JobCheckpoint.step == step,
            JobCheckpoint.global_step == int(m["gs"]),
        )
    )
    if c is None or model_id(job, c) != name:  # the id must be the one the job lists (suffix, base …)
        return None
    return job, c


def _shared_with(session: Session, c: JobCheckpoint, tenant: str) -> CheckpointShare | None:
    return session.scalar(
        select(CheckpointShare).where(
            CheckpointShare.checkpoint_id == c.id, CheckpointShare.tenant_id == tenant
        )
    )


def own(session: Session, tenant: str, name: str, param: str) -> tuple[Job, JobCheckpoint]:
    """A checkpoint of the caller's own job, or a 404 (another tenant's is not found, not forbidden)."""
    found = _find(session, name)
    if found is None or found[0].tenant_id != tenant:
        raise NotFoundError(f"{param}: no checkpoint {name} of yours", param=param)
    return found


def model_folder(session: Session, tenant: str, name: str, param: str) -> Path:
    """Where a checkpoint's chat model lies, for its owner and for the tenants it is shared with; a 400
    naming `param` when it is not a chat model or was not kept."""
    found = _find(session, name)
    if found is None or (found[0].tenant_id != tenant and _shared_with(session, found[1], tenant) is None):
        raise InvalidRequestError(f"{param}: no model {name}", param=param, code="model_not_found")
    job, c = found
    if job.method == "reinforcement" and c.step == 2:
        raise InvalidRequestError(
            f"{param}: {name} is a checkpoint of the reward model, which scores answers; use a checkpoint of "
            "step 1 or 3",
            param=param,
        )
    path = Path(c.path)
    if not (path / "config.json").is_file():
        raise InvalidRequestError(
            f"{param}: checkpoint {name} has no model kept (older checkpoints are pruned: "
            "config.<step>.keep_checkpoints; jobs before checkpoint_models kept training state only)",
            param=param,
            code="model_not_found",
        )
    return path


def shared_models(session: Session, tenant: str) -> list[ModelObject]:
    """The checkpoints other tenants shared with `tenant`, as models (owned_by the owner)."""
    rows = session.execute(
        select(CheckpointShare, JobCheckpoint, Job)
        .join(JobCheckpoint, JobCheckpoint.id == CheckpointShare.checkpoint_id)
        .join(Job, Job.id == JobCheckpoint.job_id)
        .where(CheckpointShare.tenant_id == tenant)
        .order_by(CheckpointShare.created_at)
    ).all()
    return [
        ModelObject(id=model_id(job, c), created=int(c.created_at.timestamp()), owned_by=share.owner_id)
        for share, c, job in rows
    ]


def shares_of_job(session: Session, job_id: str) -> list[CheckpointShare]:
    return list(
        session.scalars(
            select(CheckpointShare)
            .join(JobCheckpoint, JobCheckpoint.id == CheckpointShare.checkpoint_id)
            .where(JobCheckpoint.job_id == job_id)
        )
    )


# ---------------------------------------------------------------------------- permissions


def _permission(share: CheckpointShare) -> CheckpointPermission:
    return CheckpointPermission(
        id=share.id, created_at=int(share.created_at.timestamp()), project_id=share.tenant_id
    )


def grant(
    *, session: Session, tenant: str, checkpoint: str, project_ids: list[str]
) -> CheckpointPermissionList:
    """Share the caller's checkpoint with each tenant of `project_ids` (a second grant answers the first)."""
    job, c = own(session, tenant, checkpoint, "fine_tuned_model_checkpoint")
    model_folder(session, tenant, checkpoint, "fine_tuned_model_checkpoint")  # a model to share, or 400
    if not project_ids:
        raise InvalidRequestError("project_ids: give at least one project (tenant) id", param="project_ids")
    out = []
    for i, project in enumerate(project_ids):
        if project == tenant:
            raise InvalidRequestError(
                f"project_ids[{i}]: {project} is your own project; it has the checkpoint already",
                param="project_ids",
            )
        if session.get(Tenant, project) is None:
            raise InvalidRequestError(f"project_ids[{i}]: no project {project!r}", param="project_ids")
        share = _shared_with(session, c, project)
        if share is None:
            share = CheckpointShare(checkpoint_id=c.id, owner_id=tenant, tenant_id=project)
            session.add(share)
            session.flush()
        out.append(_permission(share))
    return paged(CheckpointPermissionList, out, False)


def permissions(
    *,
    session: Session,
    tenant: str,
    checkpoint: str,
    after: str | None,
    limit: int,
    order: Literal["ascending", "descending"],
    project_id: str | None,
) -> CheckpointPermissionList:
    _, c = own(session, tenant, checkpoint, "fine_tuned_model_checkpoint")
    q = select(CheckpointShare).where(CheckpointShare.checkpoint_id == c.id)
    if project_id is not None:
        q = q.where(CheckpointShare.tenant_id == project_id)
    q = q.order_by(CheckpointShare.created_at, CheckpointShare.id)
    rows = list(session.scalars(q))
    if order == "descending":
        rows.reverse()
    page, more = cut(rows, after=after, limit=limit, id_of=lambda r: r.id, what="permission")
    return paged(CheckpointPermissionList, [_permission(r) for r in page], more)


def revoke(*, session: Session, tenant: str, checkpoint: str, permission_id: str) -> None:
    _, c = own(session, tenant, checkpoint, "fine_tuned_model_checkpoint")
    share = session.get(CheckpointShare, permission_id)
    if share is None or share.checkpoint_id != c.id:
        raise NotFoundError(
            f"permission_id: no permission {permission_id} on {checkpoint}", param="permission_id"
        )
    session.delete(share)
    session.flush()
