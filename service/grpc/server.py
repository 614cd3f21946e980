"""The public gRPC API: JobService, ChatService, ModelService, plus health checking and reflection.

Each RPC authenticates `authorization: Bearer <key>` metadata, converts its request to the same
pydantic model REST validates, and calls the same service function; a `ServiceError` leaves with the
gRPC code of service.errors.ERROR_TABLE and the field at fault in the trailing metadata
(`error-param`, `error-code`). `RPC_ROUTES` pairs every RPC with its REST route (a test checks that
the two surfaces match); `REST_ONLY` lists the routes that stay REST-only and why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from pydantic import ValidationError
from sqlalchemy.orm import Session

from service.db.models import Job
from service.db.session import DB_DOWN, session_scope
from service.errors import (
    InvalidRequestError,
    ServiceError,
    database_unavailable,
    from_value_error,
    status_of,
)
from service.grpc.convert import from_pb, to_dict, to_pb
from service.grpc.pb import chat_pb2, chat_pb2_grpc, jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc
from service.jobs import lifecycle, plan
from service.jobs import queries as svc
from service.limits import Counter, check_chat_tokens, check_requests, count_chat_tokens
from service.schemas import (
    ChatCompletionRequest,
    Estimate,
    EstimateRequest,
    EventObject,
    JobCreate,
    MetricPoint,
)
from service.services import chat as chat_svc
from service.services import models as models_svc
from service.services.keys import Caller, authenticate, cached_caller
from service.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

RPC_ROUTES: dict[str, tuple[str, str]] = {
    "JobService.CreateJob": ("POST", "/v1/fine_tuning/jobs"),
    "JobService.EstimateJob": ("POST", "/v1/fine_tuning/jobs/estimate"),
    "JobService.ListJobs": ("GET", "/v1/fine_tuning/jobs"),
    "JobService.GetJob": ("GET", "/v1/fine_tuning/jobs/{job_id}"),
    "JobService.CancelJob": ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"),
    "JobService.PauseJob": ("POST", "/v1/fine_tuning/jobs/{job_id}/pause"),
    "JobService.ResumeJob": ("POST", "/v1/fine_tuning/jobs/{job_id}/resume"),
    "JobService.ListEvents": ("GET", "/v1/fine_tuning/jobs/{job_id}/events"),
    "JobService.WatchJob": ("GET", "/v1/fine_tuning/jobs/{job_id}/events"),  # ?stream=true
    "JobService.ListCheckpoints": ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"),
    "JobService.ListMetrics": ("GET", "/v1/fine_tuning/jobs/{job_id}/metrics"),
    "JobService.ListRollouts": ("GET", "/v1/fine_tuning/jobs/{job_id}/rollouts"),
    "ChatService.Chat": ("POST", "/v1/chat/completions"),
    "ModelService.ListModels": ("GET", "/v1/models"),
    "ModelService.GetModel": ("GET", "/v1/models/{model_id}"),
    "ModelService.DeleteModel": ("DELETE", "/v1/models/{model_id}"),
}
EVALS_REST = "OpenAI's Evals API (client.evals): REST-only for now"
REST_ONLY: dict[tuple[str, str], str] = {
    (
        "POST",
        "/v1/embeddings",
    ): "OpenAI's embeddings: REST-only for now (graders use them inside the service)",
    ("POST", "/v1/fine_tuning/alpha/graders/validate"): "OpenAI's alpha grader endpoints: REST-only for now",
    ("POST", "/v1/fine_tuning/alpha/graders/run"): "OpenAI's alpha grader endpoints: REST-only for now",
    ("POST", "/v1/responses"): "OpenAI's Responses API: REST-only (gRPC's ChatService has the same turn)",
    ("GET", "/v1/responses/{response_id}"): "OpenAI's Responses API: REST-only",
    ("DELETE", "/v1/responses/{response_id}"): "OpenAI's Responses API: REST-only",
    ("GET", "/v1/responses/{response_id}/input_items"): "OpenAI's Responses API: REST-only",
    ("POST", "/v1/files"): "multipart upload",
    ("GET", "/v1/files"): "files are REST-only",
    ("GET", "/v1/files/{file_id}"): "files are REST-only",
    ("DELETE", "/v1/files/{file_id}"): "files are REST-only",
    ("GET", "/v1/files/{file_id}/content"): "files are REST-only",
    ("POST", "/v1/models"): "model archive upload",
    (
        "POST",
        "/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions",
    ): "sharing: REST-only (an administrator's call, OpenAI's admin endpoints)",
    ("GET", "/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions"): "sharing: REST-only",
    ("DELETE", "/v1/fine_tuning/checkpoints/{fine_tuned_model_checkpoint}/permissions/{permission_id}"): (
        "sharing: REST-only"
    ),
    ("GET", "/v1/models/{model_id}/content"): "model archive download",
    ("POST", "/v1/fine_tuning/jobs/{job_id}/promote"): "promoting a checkpoint: REST-only for now",
    ("POST", "/v1/evals"): EVALS_REST,
    ("GET", "/v1/evals"): EVALS_REST,
    ("GET", "/v1/evals/{eval_id}"): EVALS_REST,
    ("POST", "/v1/evals/{eval_id}"): EVALS_REST,
    ("DELETE", "/v1/evals/{eval_id}"): EVALS_REST,
    ("POST", "/v1/evals/{eval_id}/runs"): EVALS_REST,
    ("GET", "/v1/evals/{eval_id}/runs"): EVALS_REST,
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}"): EVALS_REST,
    ("POST", "/v1/evals/{eval_id}/runs/{run_id}"): EVALS_REST,
    ("POST", "/v1/evals/{eval_id}/runs/{run_id}/cancel"): EVALS_REST,
    ("DELETE", "/v1/evals/{eval_id}/runs/{run_id}"): EVALS_REST,
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items"): EVALS_REST,
    ("GET", "/v1/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}"): EVALS_REST,
}


# ---------------------------------------------------------------------------- plumbing


def _abort_args(e: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or "request"
        e = InvalidRequestError(
            f"{param}: {str(first.get('msg', 'invalid value')).removeprefix('Value error, ')}",
            param=param,
            code="invalid_value",
        )
    elif isinstance(e, ValueError) and not isinstance(e, ServiceError):
        e = from_value_error(e)
    assert isinstance(e, ServiceError)
    _, code = status_of(e)
    meta = [("error-code", e.code or ""), ("error-param", e.param or "")]
    if e.retry_after:
        meta.append(("retry-after", str(e.retry_after)))
    return grpc.StatusCode[code], e.message, tuple(meta)


async def _abort(context: grpc.aio.ServicerContext, e: Exception) -> None:
    code, message, meta = _abort_args(e)
    context.set_trailing_metadata(meta)
    await context.abort(code, message)


def rpc(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Unary RPC: the caller is authenticated, errors leave through the one table."""

    @functools.wraps(fn)
    async def wrapper(self: Base, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            caller = await self.caller(context)
            return await fn(self, request, context, caller)
        except (ServiceError, ValueError) as e:  # ValidationError is a ValueError
            await _abort(context, e)
        except DB_DOWN:
            await _abort(context, database_unavailable(self.settings.retry_after_s))
        except Exception:
            logger.exception("gRPC %s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; it was logged")

    return wrapper


def stream_rpc(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
    """Server-streaming RPC: as `rpc`; an error after some messages ends the stream with its status."""

    @functools.wraps(fn)
    async def wrapper(self: Base, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            caller = await self.caller(context)
            async for item in fn(self, request, context, caller):
                yield item
        except (ServiceError, ValueError) as e:
            await _abort(context, e)
        except DB_DOWN:
            await _abort(context, database_unavailable(self.settings.retry_after_s))
        except Exception:
            logger.exception("gRPC %s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; it was logged")

    return wrapper


class Base:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.counter = Counter(settings)  # the REST API's limits, counted in the same place

    async def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        cache_s = self.settings.auth_cache_s
        if (caller := cached_caller(authorization, cache_s)) is None:
            caller = await self.db(
                lambda s: authenticate(session=s, authorization=authorization, cache_s=cache_s)
            )
        if self.settings.rate_limit_per_minute:
            await check_requests(self.counter, self.settings.rate_limit_per_minute, authorization)
        return caller

    async def db(self, fn: Callable[[Session], T]) -> T:
        """Run `fn(session)` in a worker thread (the service functions are synchronous)."""

        def run() -> T:
            with session_scope(self.settings.db_url) as s:
                return fn(s)

        return await asyncio.to_thread(run)

    async def page(
        self,
        request: Any,
        response: Any,
        lister: Callable[..., Any],
        *,
        default: int,
        top: int = 100,
        **kw: Any,
    ) -> Any:
        """A list RPC: `after` and `limit` read from the request (limit checked against `top`), the
        service's `lister(session=…, after=…, limit=…, **kw)` run, its page converted to `response`."""
        after, limit = _opt(request, "after"), _limit(request, default, top)
        page = await self.db(lambda s: lister(session=s, after=after, limit=limit, **kw))
        return to_pb(page, response)


def _opt(request: Any, name: str, default: Any = None) -> Any:
    return getattr(request, name) if request.HasField(name) else default


def _limit(request: Any, default: int, top: int = 100) -> int:
    limit = _opt(request, "limit", default)
    if not 1 <= limit <= top:
        raise InvalidRequestError(f"limit: must be between 1 and {top}", param="limit")
    return int(limit)


# ---------------------------------------------------------------------------- services


class JobService(Base, jobs_pb2_grpc.JobServiceServicer):
    @rpc
    async def CreateJob(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        req = from_pb(request.job, JobCreate)
        key = request.idempotency_key or None
        job = await self.db(
            lambda s: svc.to_object(
                lifecycle.submit_job(
                    session=s, tenant=caller.tenant_id, req=req, settings=self.settings, idempotency_key=key
                )
            )
        )
        return to_pb(job, jobs_pb2.Job)

    @rpc
    async def EstimateJob(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        extra = to_dict(request)
        extra.pop("job", None)
        req = from_pb(request.job, EstimateRequest, **extra)
        est = await self.db(
            lambda s: plan.estimate(session=s, tenant=caller.tenant_id, req=req, settings=self.settings)
        )
        return to_pb(Estimate.model_validate(est), jobs_pb2.Estimate)

    @rpc
    async def GetJob(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        job = await self.db(
            lambda s: svc.to_object(svc.get_job(session=s, tenant=caller.tenant_id, job_id=request.id))
        )
        return to_pb(job, jobs_pb2.Job)

    @rpc
    async def ListJobs(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        return await self.page(
            request,
            jobs_pb2.ListJobsResponse,
            svc.list_jobs,
            default=20,
            tenant=caller.tenant_id,
            metadata=dict(request.metadata) or None,
        )

    async def _transition(self, action: Callable[..., Job], request: Any, caller: Caller, **kw: Any) -> Any:
        job = await self.db(
            lambda s: svc.to_object(action(session=s, tenant=caller.tenant_id, job_id=request.id, **kw))
        )
        return to_pb(job, jobs_pb2.Job)

    @rpc
    async def CancelJob(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        return await self._transition(lifecycle.cancel, request, caller)

    @rpc
    async def PauseJob(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        return await self._transition(lifecycle.pause, request, caller)

    @rpc
    async def ResumeJob(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        return await self._transition(lifecycle.resume_job, request, caller, settings=self.settings)

    @rpc
    async def ListEvents(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        return await self.page(
            request,
            jobs_pb2.ListEventsResponse,
            svc.list_events,
            default=20,
            tenant=caller.tenant_id,
            job_id=request.id,
        )

    @rpc
    async def ListCheckpoints(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        return await self.page(
            request,
            jobs_pb2.ListCheckpointsResponse,
            svc.list_checkpoints,
            default=10,
            tenant=caller.tenant_id,
            job_id=request.id,
        )

    @rpc
    async def ListMetrics(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        step = _opt(request, "step")
        if step is not None and not 1 <= step <= 3:
            raise InvalidRequestError("step: must be 1, 2 or 3", param="step")
        return await self.page(
            request,
            jobs_pb2.ListMetricsResponse,
            svc.list_metrics,
            default=1000,
            top=10_000,
            tenant=caller.tenant_id,
            job_id=request.id,
            step=step,
        )

    @rpc
    async def ListRollouts(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        return await self.page(
            request,
            jobs_pb2.ListRolloutsResponse,
            svc.list_rollouts,
            default=20,
            tenant=caller.tenant_id,
            job_id=request.id,
        )

    @stream_rpc
    async def WatchJob(self, request: Any, context: Any, caller: Caller) -> AsyncIterator[Any]:  # noqa: N802
        await self.db(lambda s: svc.get_job(session=s, tenant=caller.tenant_id, job_id=request.id))
        async for item in svc.follow(db_url=self.settings.db_url, job_id=request.id, metrics=True):
            if isinstance(item, EventObject):
                yield jobs_pb2.WatchJobUpdate(event=to_pb(item, jobs_pb2.Event))
            elif isinstance(item, MetricPoint):
                yield jobs_pb2.WatchJobUpdate(metric=to_pb(item, jobs_pb2.MetricPoint))
            else:
                yield jobs_pb2.WatchJobUpdate(job=to_pb(item, jobs_pb2.Job))


class ModelService(Base, models_pb2_grpc.ModelServiceServicer):
    @rpc
    async def ListModels(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        return await self.page(
            request,
            models_pb2.ListModelsResponse,
            models_svc.list_page,
            default=1000,
            top=1000,
            tenant=caller.tenant_id,
            models_dir=self.settings.models_dir,
        )

    @rpc
    async def GetModel(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        model = await self.db(
            lambda s: models_svc.get_model(
                session=s, tenant=caller.tenant_id, models_dir=self.settings.models_dir, model_id=request.id
            )
        )
        return to_pb(model, models_pb2.Model)

    @rpc
    async def DeleteModel(self, request: Any, context: Any, caller: Caller) -> Any:  # noqa: N802
        def delete(s: Session) -> None:
            models_svc.delete_model(session=s, tenant=caller.tenant_id, model_id=request.id)

        await self.db(delete)
        chat_svc.forget(request.id)
        return models_pb2.DeletedModel(id=request.id, object="model", deleted=True)


class ChatService(Base, chat_pb2_grpc.ChatServiceServicer):
    @stream_rpc
    async def Chat(self, request: Any, context: Any, caller: Caller) -> AsyncIterator[Any]:  # noqa: N802
        req = from_pb(request, ChatCompletionRequest, stream=True)
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        await check_chat_tokens(self.counter, self.settings, authorization)
        stream = await chat_svc.open_chat(settings=self.settings, req=req, tenant=caller.tenant_id)
        head: dict[str, Any] = {
            "id": stream.id,
            "object": "chat.completion.chunk",
            "created": stream.created,
            "model": stream.model,
        }
        try:
            yield chat_pb2.ChatChunk(
                **head,
                choices=[
                    chat_pb2.ChatChunkChoice(index=i, delta=chat_pb2.ChatDelta(role="assistant", content=""))
                    for i in range(stream.n)
                ],
            )
            async for item in stream:
                if isinstance(item, chat_svc.Finished):
                    usage = chat_pb2.Usage(
                        prompt_tokens=item.prompt_tokens,
                        completion_tokens=item.completion_tokens,
                        total_tokens=item.prompt_tokens + item.completion_tokens,
                    )
                    yield chat_pb2.ChatChunk(**head, usage=usage)
                    return
                choice = chat_pb2.ChatChunkChoice(
                    index=item.index, delta=chat_pb2.ChatDelta(content=item.text)
                )
                if item.finish_reason in ("stop", "length", "tool_calls"):
                    choice.finish_reason = item.finish_reason
                for k, call in enumerate(item.tool_calls):
                    choice.delta.tool_calls.add(
                        index=k,
                        id=call["id"],
                        type="function",
                        function=chat_pb2.FunctionCall(**call["function"]),
                    )
                if item.reward is not None:
                    choice.reward = item.reward
                if stream.logprobs:
                    choice.logprobs.content.extend(chat_pb2.TokenLogprob(**lp) for lp in item.logprobs)
                    choice.logprobs.SetInParent()
                yield chat_pb2.ChatChunk(**head, choices=[choice])
        finally:  # however the reply ended (the caller gone too): stop generating, charge what was generated
            stream.cancel()
            await count_chat_tokens(self.counter, self.settings, authorization, stream.take_tokens())


# ---------------------------------------------------------------------------- the server


SERVICE_NAMES = ["rlhf.v1.JobService", "rlhf.v1.ChatService", "rlhf.v1.ModelService"]


async def start_server(
    settings: Settings, *, host: str | None = None, port: int | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the public gRPC server (health and reflection included); returns it and its port."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_body_bytes)])
    jobs_pb2_grpc.add_JobServiceServicer_to_server(JobService(settings), server)
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatService(settings), server)
    models_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(settings), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *SERVICE_NAMES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(
        f"{host or settings.host}:{settings.grpc_port if port is None else port}"
    )
    if not bound:
        raise ValueError(f"grpc_port: cannot listen on {host or settings.host}:{settings.grpc_port}")
    await server.start()
    return server, bound
