"""/v1/evals: OpenAI's Evals API — evals, their runs (executed by an evals worker) and each run's output
items, paged like every list. `client.evals.*` of the official SDK works unchanged."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from service.api.deps import CallerDep, SessionDep, SettingsDep
from service.api.jobs import Limit, respond
from service.api.openapi import COMMON, errors
from service.pagination import paged
from service.queue import enqueue_eval
from service.schemas import (
    EvalCreate,
    EvalDeleted,
    EvalList,
    EvalObject,
    EvalOutputItemList,
    EvalOutputItemObject,
    EvalRunCreate,
    EvalRunDeleted,
    EvalRunList,
    EvalRunObject,
    EvalUpdate,
)
from service.services import evals as svc

router = APIRouter(prefix="/v1/evals", tags=["evals"], responses=errors(*COMMON))
Order = Annotated[Literal["asc", "desc"], Query(description="by creation time")]


def _eval(row: Any) -> EvalObject:
    return EvalObject(**svc.eval_object(row))


def _run(row: Any) -> EvalRunObject:
    return EvalRunObject(**svc.run_object(row))


@router.post("", response_model=EvalObject, responses=errors(404))
def create_eval(body: EvalCreate, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> Any:
    row = svc.create_eval(session=session, tenant=caller.tenant_id, body=body.model_dump(), settings=settings)
    session.commit()
    return respond(_eval(row))


@router.get("", response_model=EvalList, responses=errors(404))
def list_evals(
    caller: CallerDep, session: SessionDep, after: str | None = None, limit: Limit = 20, order: Order = "asc"
) -> Any:
    rows, more = svc.list_evals(
        session=session, tenant=caller.tenant_id, after=after, limit=limit, order=order
    )
    return respond(paged(EvalList, [_eval(r) for r in rows], more))


@router.get("/{eval_id}", response_model=EvalObject, responses=errors(404))
def get_eval(eval_id: str, caller: CallerDep, session: SessionDep) -> Any:
    return respond(_eval(svc.get_eval(session=session, tenant=caller.tenant_id, eval_id=eval_id)))


@router.post("/{eval_id}", response_model=EvalObject, responses=errors(404))
def update_eval(eval_id: str, body: EvalUpdate, caller: CallerDep, session: SessionDep) -> Any:
    row = svc.get_eval(session=session, tenant=caller.tenant_id, eval_id=eval_id)
    if body.name is not None:
        row.name = body.name
    if body.metadata is not None:
        row.eval_metadata = body.metadata
    session.commit()
    return respond(_eval(row))


@router.delete("/{eval_id}", response_model=EvalDeleted, responses=errors(404))
def delete_eval(eval_id: str, caller: CallerDep, session: SessionDep) -> Any:
    svc.delete_eval(session=session, tenant=caller.tenant_id, eval_id=eval_id)
    session.commit()
    return respond(EvalDeleted(eval_id=eval_id))


@router.post("/{eval_id}/runs", response_model=EvalRunObject, responses=errors(404))
def create_run(
    eval_id: str, body: EvalRunCreate, caller: CallerDep, session: SessionDep, settings: SettingsDep
) -> Any:
    """Checked whole (rows against the item schema, the model, the templates) before it is queued."""
    run = svc.create_run(
        session=session, tenant=caller.tenant_id, eval_id=eval_id, body=body.model_dump(), settings=settings
    )
    session.commit()  # on record before any worker looks for it
    enqueue_eval(run.id, settings)
    return respond(_run(run))


@router.get("/{eval_id}/runs", response_model=EvalRunList, responses=errors(404))
def list_runs(
    eval_id: str,
    caller: CallerDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    status: str | None = None,
) -> Any:
    rows, more = svc.list_runs(
        session=session,
        tenant=caller.tenant_id,
        eval_id=eval_id,
        after=after,
        limit=limit,
        order=order,
        status=status,
    )
    return respond(paged(EvalRunList, [_run(r) for r in rows], more))


@router.get("/{eval_id}/runs/{run_id}", response_model=EvalRunObject, responses=errors(404))
def get_run(eval_id: str, run_id: str, caller: CallerDep, session: SessionDep) -> Any:
    return respond(
        _run(svc.get_run(session=session, tenant=caller.tenant_id, eval_id=eval_id, run_id=run_id))
    )


@router.post("/{eval_id}/runs/{run_id}/cancel", response_model=EvalRunObject, responses=errors(404))
@router.post("/{eval_id}/runs/{run_id}", response_model=EvalRunObject, responses=errors(404))
def cancel_run(eval_id: str, run_id: str, caller: CallerDep, session: SessionDep) -> Any:
    """Cancel (the SDK posts to …/cancel; OpenAI's reference, to the run): a queued run ends at once, a
    running one at its next batch."""
    run = svc.cancel_run(session=session, tenant=caller.tenant_id, eval_id=eval_id, run_id=run_id)
    session.commit()
    return respond(_run(run))


@router.delete("/{eval_id}/runs/{run_id}", response_model=EvalRunDeleted, responses=errors(404))
def delete_run(eval_id: str, run_id: str, caller: CallerDep, session: SessionDep) -> Any:
    svc.delete_run(session=session, tenant=caller.tenant_id, eval_id=eval_id, run_id=run_id)
    session.commit()
    return respond(EvalRunDeleted(run_id=run_id))


@router.get("/{eval_id}/runs/{run_id}/output_items", response_model=EvalOutputItemList, responses=errors(404))
def list_output_items(
    eval_id: str,
    run_id: str,
    caller: CallerDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    status: Literal["pass", "fail"] | None = None,
) -> Any:
    run = svc.get_run(session=session, tenant=caller.tenant_id, eval_id=eval_id, run_id=run_id)
    rows, more = svc.list_output_items(
        session=session, run=run, after=after, limit=limit, order=order, status=status
    )
    return respond(
        paged(
            EvalOutputItemList, [EvalOutputItemObject(**svc.output_item_object(r, run)) for r in rows], more
        )
    )


@router.get(
    "/{eval_id}/runs/{run_id}/output_items/{output_item_id}",
    response_model=EvalOutputItemObject,
    responses=errors(404),
)
def get_output_item(
    eval_id: str, run_id: str, output_item_id: str, caller: CallerDep, session: SessionDep
) -> Any:
    run = svc.get_run(session=session, tenant=caller.tenant_id, eval_id=eval_id, run_id=run_id)
    item = svc.get_output_item(session=session, run=run, item_id=output_item_id)
    return respond(EvalOutputItemObject(**svc.output_item_object(item, run)))
