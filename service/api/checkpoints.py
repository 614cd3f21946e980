"""/v1/fine_tuning/checkpoints/{checkpoint}/permissions: OpenAI's checkpoint permissions — share one of
your checkpoints with another tenant (project id = tenant), list and revoke the shares."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from service.api.deps import CallerDep, SessionDep
from service.api.openapi import COMMON, errors
from service.schemas import CheckpointPermissionList, Deleted, PermissionCreate
from service.services import chat as chat_svc
from service.services import checkpoints as svc

router = APIRouter(
    prefix="/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions",
    tags=["fine-tuning"],
    responses=errors(*COMMON),
)


@router.post("", response_model=CheckpointPermissionList, responses=errors(404))
def grant(
    fine_tuned_model_checkpoint: str, body: PermissionCreate, caller: CallerDep, session: SessionDep
) -> Any:
    """Share the checkpoint: each tenant of `project_ids` may then chat with it and fine-tune from it
    (and sees nothing else of yours)."""
    page = svc.grant(
        session=session,
        tenant=caller.tenant_id,
        checkpoint=fine_tuned_model_checkpoint,
        project_ids=body.project_ids,
    )
    session.commit()
    return page


@router.get("", response_model=CheckpointPermissionList, responses=errors(404))
def permissions(
    fine_tuned_model_checkpoint: str,
    caller: CallerDep,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100, description="page size")] = 10,
    order: Literal["ascending", "descending"] = "descending",
    project_id: str | None = None,
) -> Any:
    return svc.permissions(
        session=session,
        tenant=caller.tenant_id,
        checkpoint=fine_tuned_model_checkpoint,
        after=after,
        limit=limit,
        order=order,
        project_id=project_id,
    )


@router.delete("/{permission_id}", response_model=Deleted, responses=errors(404))
def revoke(
    fine_tuned_model_checkpoint: str, permission_id: str, caller: CallerDep, session: SessionDep
) -> Any:
    """Stop sharing: that tenant can no longer chat with the checkpoint or start jobs from it."""
    svc.revoke(
        session=session,
        tenant=caller.tenant_id,
        checkpoint=fine_tuned_model_checkpoint,
        permission_id=permission_id,
    )
    session.commit()
    chat_svc.forget(fine_tuned_model_checkpoint)
    return Deleted(id=permission_id, object="checkpoint.permission")
