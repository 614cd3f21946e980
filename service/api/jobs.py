"""/v1/fine_tuning/jobs: OpenAI's fine-tuning API, plus pause/resume, metrics, rollouts and estimate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from service.api.deps import CallerDep, SessionDep, SettingsDep
from service.api.openapi import COMMON, errors
from service.errors import InvalidRequestError, ServiceError
from service.jobs import lifecycle, plan
from service.jobs import queries as svc
from service.schemas import (
    CheckpointList,
    Estimate,
    EstimateRequest,
    EventList,
    EventObject,
    JobCreate,
    JobList,
    JobObject,
    MetricList,
    MetricPoint,
    RolloutList,
)

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=errors(*COMMON))


def respond(model: BaseModel) -> Response:
    """The body, serialised once (returning the model would have FastAPI validate it again)."""
    return Response(model.model_dump_json(), media_type="application/json")


Limit = Annotated[int, Query(ge=1, le=100, description="page size")]
# the `after` cursor of the time series (metrics, rollouts), whose ids are positions
Position = Annotated[int | None, Query(ge=0, description="the last id of the previous page")]


@router.post("", response_model=JobObject, responses=errors(404, 409))
def create_job(
    body: JobCreate,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Any:
    job = lifecycle.submit_job(
        session=session, tenant=caller.tenant_id, req=body, settings=settings, idempotency_key=idempotency_key
    )
    return respond(svc.to_object(job))


@router.post("/estimate", response_model=Estimate, responses=errors(404))
def estimate(body: EstimateRequest, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> Any:
    return plan.estimate(session=session, tenant=caller.tenant_id, req=body, settings=settings)


@router.get("", response_model=JobList, responses=errors(404))
def list_jobs(
    request: Request, caller: CallerDep, session: SessionDep, after: str | None = None, limit: Limit = 20
) -> Any:
    """`metadata[key]=value` (OpenAI's filter, repeatable): only jobs whose metadata holds every pair."""
    metadata: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]") and len(name) > len("metadata[]"):
            metadata[name[len("metadata[") : -1]] = value
        elif name.startswith("metadata"):
            raise InvalidRequestError(
                f"{name}: filter by metadata as metadata[key]=value (e.g. metadata[team]=search)",
                param="metadata",
            )
    return respond(
        svc.list_jobs(
            session=session, tenant=caller.tenant_id, after=after, limit=limit, metadata=metadata or None
        )
    )


@router.get("/{job_id}", response_model=JobObject, responses=errors(404))
def get_job(job_id: str, caller: CallerDep, session: SessionDep) -> Any:
    return respond(svc.to_object(svc.get_job(session=session, tenant=caller.tenant_id, job_id=job_id)))


@router.post("/{job_id}/cancel", response_model=JobObject, responses=errors(404))
def cancel(job_id: str, caller: CallerDep, session: SessionDep) -> Any:
    job = lifecycle.cancel(session=session, tenant=caller.tenant_id, job_id=job_id)
    session.commit()
    return respond(svc.to_object(job))


@router.post("/{job_id}/pause", response_model=JobObject, responses=errors(404))
def pause(job_id: str, caller: CallerDep, session: SessionDep) -> Any:
    job = lifecycle.pause(session=session, tenant=caller.tenant_id, job_id=job_id)
    session.commit()
    return respond(svc.to_object(job))


@router.post("/{job_id}/resume", response_model=JobObject, responses=errors(404))
def resume(job_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> Any:
    job = lifecycle.resume_job(session=session, tenant=caller.tenant_id, job_id=job_id, settings=settings)
    return respond(svc.to_object(job))


@router.get("/{job_id}/events", response_model=EventList, responses=errors(404))
def events(
    request: Request,
    job_id: str,
    caller: CallerDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
    stream: bool = False,
    metrics: bool = False,
) -> Any:
    """With `stream=true`: server-sent events (every event from the start, then live ones; `[DONE]` last).
    `metrics=true` adds each metric point as an `event: metric` and the job as it ended as an `event: job`
    (what the web console draws its live curves from); without it the stream is OpenAI's."""
    if stream:
        svc.get_job(session=session, tenant=caller.tenant_id, job_id=job_id)
        return _event_stream(request, job_id, metrics=metrics)
    if metrics:
        raise InvalidRequestError(
            "metrics: only with stream=true (for metric points without a stream: GET "
            f"/v1/fine_tuning/jobs/{job_id}/metrics)",
            param="metrics",
        )
    return respond(
        svc.list_events(session=session, tenant=caller.tenant_id, job_id=job_id, after=after, limit=limit)
    )


def _event_stream(request: Request, job_id: str, *, metrics: bool) -> Any:
    from sse_starlette.sse import EventSourceResponse

    async def gen() -> AsyncIterator[dict[str, str]]:
        try:
            async for item in svc.follow(
                db_url=request.app.state.settings.db_url, job_id=job_id, metrics=metrics
            ):
                if isinstance(item, EventObject):
                    yield {"data": item.model_dump_json()}
                elif metrics:
                    yield {
                        "event": "metric" if isinstance(item, MetricPoint) else "job",
                        "data": item.model_dump_json(),
                    }
        except Exception as e:  # after the headers: an error event, then the end
            err = (
                e.envelope()
                if isinstance(e, ServiceError)
                else {"error": {"message": "event stream failed", "type": "server_error"}}
            )
            yield {"event": "error", "data": json.dumps(err)}
        yield {"data": "[DONE]"}

    return EventSourceResponse(gen(), ping=15)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=errors(404))
def checkpoints(
    job_id: str, caller: CallerDep, session: SessionDep, after: str | None = None, limit: Limit = 10
) -> Any:
    return respond(
        svc.list_checkpoints(
            session=session, tenant=caller.tenant_id, job_id=job_id, after=after, limit=limit
        )
    )


@router.get("/{job_id}/metrics", response_model=MetricList, responses=errors(404))
def metrics(
    job_id: str,
    caller: CallerDep,
    session: SessionDep,
    step: Annotated[int | None, Query(ge=1, le=3)] = None,
    after: Position = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    return respond(
        svc.list_metrics(
            session=session, tenant=caller.tenant_id, job_id=job_id, step=step, after=after, limit=limit
        )
    )


@router.get("/{job_id}/rollouts", response_model=RolloutList, responses=errors(404))
def rollouts(
    job_id: str, caller: CallerDep, session: SessionDep, after: Position = None, limit: Limit = 20
) -> Any:
    return respond(
        svc.list_rollouts(session=session, tenant=caller.tenant_id, job_id=job_id, after=after, limit=limit)
    )


__all__ = ["router"]


class PromoteRequest(BaseModel):
    checkpoint: str | None = Field(
        default=None, max_length=255, description="a checkpoint model id of the job"
    )
    eval_id: str | None = Field(
        default=None, max_length=64, description="or: the best checkpoint by this eval"
    )
    criterion: str | None = Field(
        default=None,
        max_length=128,
        description="the eval's criterion to rank by (default: its overall pass rate)",
    )


@router.post("/{job_id}/promote", response_model=JobObject, responses=errors(404))
def promote(job_id: str, body: PromoteRequest, caller: CallerDep, session: SessionDep) -> Any:
    """Ours: make a checkpoint the job's model — one named, or the best by an eval the job ran on its
    checkpoints (`evals: [{every: checkpoint}]`). Chat with the job's model id then answers with it."""
    from service.jobs import evals as job_evals
    from service.services import chat as chat_svc

    job, _ = job_evals.promote(
        session=session, tenant=caller.tenant_id, job_id=job_id, body=body.model_dump()
    )
    session.commit()
    chat_svc.forget(str(job.fine_tuned_model))  # the API's route cache: the next chat loads the new weights
    return respond(svc.to_object(job))
