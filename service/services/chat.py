"""Chat: check a request, resolve its model for the caller, route it to an inference worker, relay the
worker's stream. Shared by REST (`/v1/chat/completions`) and gRPC (`ChatService.Chat`).

Routing (docs/contracts.md §6): among workers with a fresh heartbeat, one that holds the model (least
busy first); else the one with the most room, which loads it (LRU cap per worker). None → 503 with
Retry-After. A worker that cannot be reached before answering is skipped (and marked stale until its
next heartbeat) and the next one is tried. The API keeps its view of the workers for
`route_cache_s` and a model's location once resolved, so most requests are routed without the
database. Only grpc and the generated messages are imported here:
the API process never imports torch.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db.models import InferenceWorker, utcnow
from service.db.session import session_scope
from service.errors import (
    InvalidRequestError,
    NotFoundError,
    ServiceError,
    ServiceTimeoutError,
    UnavailableError,
    WorkerFailedError,
)
from service.schemas import ChatCompletionRequest
from service.services import models as models_svc
from service.services.keys import authenticate, cached_caller
from service.settings import Settings

ROLE = {"developer": "system"}


@dataclass
class Route:
    model_id: str  # as the client named it
    key: str  # unique across tenants: what workers cache the model under
    path: Path
    workers: list[tuple[str, str]]  # (worker id, address), best first
    tenant: str = ""  # the caller's: the worker reuses cached prompts within one tenant only
    adapter_key: str = ""  # a LoRA adapter model: its key and PEFT folder (key/path above: its base)
    adapter_path: str = ""


@dataclass
class Piece:
    index: int
    text: str
    tokens: int
    finish_reason: str | None
    reward: float | None
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's TokenLogprob, one per token
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's ToolCall, on the last piece


@dataclass
class Finished:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ChatStream:
    """An accepted request: iterate it for `Piece`s then one `Finished`; errors raise `ServiceError`."""

    id: str
    created: int
    model: str
    n: int
    prompt_tokens: int
    worker_id: str
    call: Any
    timeout_s: float
    logprobs: bool = False  # the request asked for them
    tokens: int = 0  # completion tokens generated so far (the worker's own count once it finished)
    settled: bool = False

    def take_tokens(self) -> int:
        """The reply's completion tokens, once, however it ended (finished, cancelled, the client gone):
        what its key's per-minute token count is charged."""
        if self.settled:
            return 0
        self.settled = True
        return self.tokens

    async def __aiter__(self) -> AsyncIterator[Piece | Finished]:
        try:
            while True:
                try:
                    reply = await self.call.read()
                except grpc.aio.AioRpcError as e:
                    raise _error(e, self.timeout_s, started=True) from None
                if reply is grpc.aio.EOF:
                    raise WorkerFailedError(
                        "the inference worker ended the reply early; retry", code="worker_failed"
                    )
                kind = reply.WhichOneof("reply")
                if kind == "piece":
                    p = reply.piece
                    self.tokens += p.tokens
                    if not p.text and not p.HasField("finish_reason") and not p.logprobs and not p.tool_calls:
                        # text held back (a possible stop string, a split character): nothing to relay
                        continue
                    yield Piece(
                        index=p.index,
                        text=p.text,
                        tokens=p.tokens,
                        finish_reason=p.finish_reason if p.HasField("finish_reason") else None,
                        reward=p.reward if p.HasField("reward") else None,
                        logprobs=[_token_logprob(lp) for lp in p.logprobs],
                        tool_calls=[
                            {
                                "id": c.id,
                                "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments},
                            }
                            for c in p.tool_calls
                        ],
                    )
                elif kind == "finished":
                    self.tokens = reply.finished.completion_tokens
                    yield Finished(
                        prompt_tokens=reply.finished.prompt_tokens,
                        completion_tokens=reply.finished.completion_tokens,
                    )
                    return
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Stop generating (the client went away): the worker cancels the request."""
        self.call.cancel()


def _token_logprob(lp: Any) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.bytes),
        "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in lp.top],
    }


# ---------------------------------------------------------------------------- checking and routing


def check(req: ChatCompletionRequest, settings: Settings) -> None:
    """What the API can refuse without a worker: unsupported parameters and the operator's bounds (the
    worker's chat generator checks the conversation itself, stop strings and the model's context)."""
    name = req.unsupported()
    if name:
        raise InvalidRequestError(
            f"{name}: not supported by this server; remove it", param=name, code="unsupported_parameter"
        )
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise InvalidRequestError(
            "max_completion_tokens: give max_tokens or max_completion_tokens, not both",
            param="max_completion_tokens",
        )
    limit = req.max_new_tokens
    if limit is not None and limit > settings.chat_max_tokens:
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        raise InvalidRequestError(
            f"{param}: {limit} is above this server's limit of {settings.chat_max_tokens}", param=param
        )
    if (req.n or 1) > settings.chat_max_n:
        raise InvalidRequestError(
            f"n: {req.n} is above this server's limit of {settings.chat_max_n}", param="n"
        )
    if len(req.messages) > settings.chat_max_messages:
        raise InvalidRequestError(
            f"messages: {len(req.messages)} messages, at most {settings.chat_max_messages} allowed; "
            "drop the oldest turns",
            param="messages",
        )
    for i, m in enumerate(req.messages):
        if len(m.text()) > settings.chat_max_message_chars:
            raise InvalidRequestError(
                f"messages[{i}].content: longer than this server's limit of "
                f"{settings.chat_max_message_chars} characters",
                param=f"messages[{i}].content",
            )
    functions = tools_of(req)
    structured = req.response_format is not None and req.response_format.type != "text"
    if functions and structured and req.tool_choice not in (None, "auto", "none"):
        raise InvalidRequestError(
            "response_format: a reply cannot both call a tool and follow a schema; drop response_format "
            "or set tool_choice to auto",
            param="response_format",
        )
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError(
            "top_logprobs: needs logprobs: true (or leave top_logprobs out)", param="top_logprobs"
        )
    grammar_of(req)


def _choice(req: ChatCompletionRequest) -> Any:
    c = req.tool_choice
    return c if c is None or isinstance(c, str) else c.model_dump()


def tools_of(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's functions, checked as the engine checks them (a repeated name, a schema the grammar
    engine cannot compile, tool_choice naming an absent tool: a 400 naming the field)."""
    if not req.tools and req.tool_choice in (None, "auto", "none"):
        return []
    from rlhf_engine.chat.errors import ChatRequestError
    from rlhf_engine.data.tools import check as check_tools

    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    choice = _choice(req)
    try:
        return check_tools(tools, choice)
    except ChatRequestError as e:
        raise InvalidRequestError(e.message, param=e.param) from None


def grammar_of(req: ChatCompletionRequest) -> str | None:
    """The grammar `response_format` asks for (compiled once per request and kept on it); a schema the
    grammar engine cannot compile is a 400 naming the field, before any worker is asked."""
    if req.response_format is None or req.response_format.type == "text":
        return None
    if req.grammar is None:
        if req.response_format.type == "json_object" and not any(
            "json" in m.text().lower() for m in req.messages
        ):  # OpenAI's rule: a model not told to write JSON writes it badly
            raise InvalidRequestError(
                "messages: must contain the word 'json' in some form to use response_format json_object",
                param="messages",
            )
        from rlhf_engine.chat import structured
        from rlhf_engine.chat.errors import ChatRequestError

        try:
            req.grammar = structured.grammar_of(
                req.response_format.model_dump(mode="json", by_alias=True, exclude_none=True)
            )
        except ChatRequestError as e:
            raise InvalidRequestError(e.message, param=e.param) from None
    return req.grammar


def resolve_model(*, session: Session, tenant: str, model: str, settings: Settings) -> models_svc.ModelRef:
    """A model the caller may chat with; another tenant's model is not found."""
    try:
        return models_svc.resolve(
            session=session,
            tenant=tenant,
            name=model,
            models_dir=settings.models_dir,
            param="model",
            max_bytes=settings.max_model_bytes,
        )
    except InvalidRequestError as e:
        if e.code == "model_not_found":
            raise NotFoundError(
                f"model: no model {model!r} (see GET /v1/models)", param="model", code="model_not_found"
            ) from None
        raise


@dataclass(frozen=True)
class WorkerView:
    """What routing needs of a live worker's row (a snapshot: rows belong to their session)."""

    id: str
    address: str
    models: tuple[str, ...]
    adapters: tuple[str, ...]
    active: int
    capacity: int
    max_models: int


# The API's recent view of the workers and of the models it resolved, so a request whose key was
# verified moments ago is routed with no database and no thread hop. Keyed by database URL (one
# process may serve several databases: tests do). Empty views and unknown models are never kept.
_views: dict[str, tuple[float, list[WorkerView]]] = {}
# a model resolved for a tenant, for a few seconds: a model deleted or a share revoked stops answering
# within REFS_TTL_S on every API process (at once on the one that deleted it: `forget`)
_refs: dict[tuple[str, str, str], tuple[float, models_svc.ModelRef]] = {}
_REFS_MAX = 10_000
REFS_TTL_S = 10.0


def _cached_ref(key: tuple[str, str, str]) -> models_svc.ModelRef | None:
    hit = _refs.get(key)
    return hit[1] if hit is not None and hit[0] > time.monotonic() else None


def forget(model: str) -> None:
    """Drop every cached resolution of `model` (it was deleted, or a share of it revoked)."""
    for key in [k for k in _refs if k[2] == model]:
        _refs.pop(key, None)


def live_workers(*, session: Session, settings: Settings) -> list[WorkerView]:
    fresh = utcnow() - timedelta(seconds=settings.inference_ttl_s)
    rows = session.scalars(select(InferenceWorker).where(InferenceWorker.heartbeat_at > fresh))
    view = [
        WorkerView(
            id=w.id,
            address=w.address,
            models=tuple(w.models or ()),
            adapters=tuple(w.adapters or ()),
            active=w.active,
            capacity=w.capacity,
            max_models=w.max_models,
        )
        for w in rows
    ]
    if view and settings.route_cache_s > 0:
        _views[settings.db_url] = (time.monotonic() + settings.route_cache_s, view)
    return view


def route(
    *, session: Session, tenant: str, model: str, settings: Settings, inflight: dict[str, int]
) -> Route:
    ref = _cached_ref((settings.db_url, tenant, model))
    if ref is None:
        ref = resolve_model(session=session, tenant=tenant, model=model, settings=settings)
        if len(_refs) >= _REFS_MAX:
            _refs.clear()
        _refs[(settings.db_url, tenant, model)] = (time.monotonic() + REFS_TTL_S, ref)
    return _pick(ref, live_workers(session=session, settings=settings), settings, inflight, tenant)


def cached_route(*, tenant: str, model: str, settings: Settings, inflight: dict[str, int]) -> Route | None:
    """The route from the API's recent view alone (no database), or None when it has no view of the
    workers or has not resolved this model for this tenant yet."""
    ref = _cached_ref((settings.db_url, tenant, model))
    view = _views.get(settings.db_url)
    if ref is None or view is None or view[0] < time.monotonic() or not view[1]:
        return None
    return _pick(ref, view[1], settings, inflight, tenant)


def _pick(
    ref: models_svc.ModelRef,
    workers: list[WorkerView],
    settings: Settings,
    inflight: dict[str, int],
    tenant: str,
) -> Route:
    if not workers:
        raise UnavailableError(
            "no inference worker is running; start one with `rlhf worker inference` and retry",
            code="no_worker",
            retry_after=settings.retry_after_s,
        )
    served = ref.parent if ref.parent is not None and ref.adapter is not None else ref
    key, adapter = served.key, ref.key if served is not ref else None

    def load(w: WorkerView) -> float:
        return (max(w.active, inflight.get(w.id, 0)) + 1) / max(1, w.capacity)

    # workers holding the adapter first, then those holding its base (loading an adapter is a few MB),
    # then the rest (least full first)
    holding = sorted(
        (w for w in workers if key in w.models), key=lambda w: (adapter not in w.adapters, load(w), w.id)
    )
    others = sorted(
        (w for w in workers if key not in w.models),
        key=lambda w: (len(w.models) >= w.max_models, load(w), len(w.models), w.id),
    )
    return Route(
        model_id=ref.name,
        key=key,
        path=served.path,
        workers=[(w.id, w.address) for w in holding + others],
        tenant=tenant,
        adapter_key=adapter or "",
        adapter_path=str(ref.adapter) if adapter else "",
    )


def mark_stale(settings: Settings, worker_id: str) -> None:
    """A worker we could not reach gets no requests until its next heartbeat says it is back."""
    view = _views.get(settings.db_url)
    if view is not None:
        _views[settings.db_url] = (view[0], [w for w in view[1] if w.id != worker_id])
    with session_scope(settings.db_url) as s:
        stale = utcnow() - timedelta(seconds=settings.inference_ttl_s + 1)
        s.execute(update(InferenceWorker).where(InferenceWorker.id == worker_id).values(heartbeat_at=stale))


# ---------------------------------------------------------------------------- the relay

_stubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = weakref.WeakKeyDictionary()
MAX_REPLY_BYTES = 64 * 2**20  # a worker's largest message: 2048 embeddings of a wide model
_inflight: dict[str, int] = {}  # requests this API process has open per worker (between heartbeats)


def stub(address: str) -> Any:
    """One channel per worker address and event loop (aio channels belong to the loop that made them)."""
    from service.grpc.pb import worker_pb2_grpc

    stubs = _stubs.setdefault(asyncio.get_running_loop(), {})
    if address not in stubs:
        channel = grpc.aio.insecure_channel(
            address,
            options=[("grpc.enable_retries", 0), ("grpc.max_receive_message_length", MAX_REPLY_BYTES)],
        )
        stubs[address] = (worker_pb2_grpc.InferenceWorkerStub(channel), channel)
    return stubs[address][0]


async def _forget(address: str) -> None:
    """Close the channel to a worker that is gone (its address will not come back: ports are fresh)."""
    entry = _stubs.get(asyncio.get_running_loop(), {}).pop(address, None)
    if entry is not None:
        await entry[1].close()


def _error(
    e: grpc.aio.AioRpcError,
    timeout_s: float,
    *,
    started: bool,
    retry_after: int | None = None,
    tokens_field: str = "max_tokens",
) -> ServiceError:
    """A worker's gRPC error in the API's terms (`retry_after`: Retry-After of a 503, from settings)."""
    meta = dict(e.trailing_metadata() or ())
    param, code = meta.get("error-param") or None, meta.get("error-code") or None
    message = e.details() or e.code().name
    status = e.code()
    if status == grpc.StatusCode.INVALID_ARGUMENT:  # in the API's words (the engine says max_new_tokens)
        if param == "max_new_tokens":
            param, message = tokens_field, message.replace("max_new_tokens", tokens_field)
        return InvalidRequestError(message, param=param, code=code)
    if status == grpc.StatusCode.FAILED_PRECONDITION:  # the model cannot be loaded: not the client's doing
        return WorkerFailedError(message, param=param or "model", code=code or "model_load_error")
    if status == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServiceTimeoutError(
            f"the reply took longer than this server's limit of {timeout_s:g} s", code="timeout"
        )
    if status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) and started:
        return WorkerFailedError(
            "the inference worker stopped while answering; retry the request", code="worker_lost"
        )
    if status == grpc.StatusCode.UNAVAILABLE:
        return UnavailableError(
            f"inference worker unavailable: {message}",
            code=code or "worker_unavailable",
            retry_after=retry_after,
        )
    return WorkerFailedError(f"the inference worker failed: {message}", code=code or "worker_failed")


async def open_chat(
    *,
    settings: Settings,
    req: ChatCompletionRequest,
    tenant: str | None = None,
    authorization: str | None = None,
) -> ChatStream:
    """Route and submit the request; returns once a worker accepted it (so a bad key, a bad
    parameter, an unknown model or no worker raise here, before any response has started). Give the
    caller's `tenant`, or the `authorization` header to check in the same thread hop as the routing
    (one hand-off instead of two: it shows in time to first token). A key verified within
    `auth_cache_s`, a model resolved before and a view of the workers younger than `route_cache_s`
    route the request with no hand-off at all."""
    r = None
    if tenant is None and (caller := cached_caller(authorization, settings.auth_cache_s)) is not None:
        tenant = caller.tenant_id
    if tenant is not None:
        check(req, settings)  # after the key: an unknown caller learns nothing about our limits
        r = cached_route(tenant=tenant, model=req.model, settings=settings, inflight=_inflight)
    if r is None:
        r = await asyncio.to_thread(_route_in_thread, settings, tenant, authorization, req)
    message = _generate_request(r, req)
    tokens_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    meta = (("x-worker-token", settings.inference_token),) if settings.inference_token else None
    busy = False
    for worker_id, address in r.workers:
        call = stub(address).Generate(message, timeout=settings.chat_timeout_s, metadata=meta)
        _inflight[worker_id] = _inflight.get(worker_id, 0) + 1
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            _inflight[worker_id] -= 1
            busy = await refused(e, settings, worker_id, address, tokens_field=tokens_field) or busy
            continue
        except BaseException:  # cancelled while waiting (the client left): nothing leaks
            _inflight[worker_id] -= 1
            call.cancel()
            raise
        if first is grpc.aio.EOF or first.WhichOneof("reply") != "started":
            _inflight[worker_id] -= 1
            call.cancel()
            raise WorkerFailedError("the inference worker answered out of order", code="worker_failed")
        call.add_done_callback(
            lambda _c, w=worker_id: _inflight.__setitem__(w, max(0, _inflight.get(w, 1) - 1))
        )
        return ChatStream(
            id=f"chatcmpl-{secrets.token_hex(12)}",
            created=int(time.time()),
            model=r.model_id,
            n=req.n or 1,
            prompt_tokens=first.started.prompt_tokens,
            worker_id=worker_id,
            call=call,
            timeout_s=settings.chat_timeout_s,
            logprobs=bool(req.logprobs),
        )
    raise none_took(busy, settings)


async def refused(
    e: grpc.aio.AioRpcError, settings: Settings, worker_id: str, address: str, *, tokens_field: str = ""
) -> bool:
    """A worker's refusal of a request it has not started: True when it is busy and False when it cannot
    be reached (try the next worker either way); the error to answer otherwise, raised."""
    code = e.code()
    error_code = dict(e.trailing_metadata() or ()).get("error-code")
    if error_code == "model_not_ready":  # the worker builds it now; every worker would say the same
        raise UnavailableError(
            e.details() or "the model is being prepared",
            code="model_not_ready",
            param="model",
            retry_after=settings.retry_after_s,
        ) from None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or (code == grpc.StatusCode.UNAVAILABLE and error_code):
        return True  # full, or the model is being swapped out there
    if code == grpc.StatusCode.UNAVAILABLE:  # not reachable: skip it until its next heartbeat
        await asyncio.to_thread(mark_stale, settings, worker_id)
        await _forget(address)
        return False
    raise _error(
        e,
        settings.chat_timeout_s,
        started=False,
        retry_after=settings.retry_after_s,
        tokens_field=tokens_field or "max_tokens",
    ) from None


def none_took(busy: bool, settings: Settings) -> UnavailableError:
    """The 503 when no worker took a request."""
    why = "every inference worker is at capacity" if busy else "no inference worker could be reached"
    return UnavailableError(
        f"{why}; retry shortly", code="busy" if busy else "no_worker", retry_after=settings.retry_after_s
    )


def _route_in_thread(
    settings: Settings, tenant: str | None, authorization: str | None, req: ChatCompletionRequest
) -> Route:
    with session_scope(settings.db_url) as s:
        if tenant is None:  # (else the request was checked on the loop)
            tenant = authenticate(
                session=s, authorization=authorization, cache_s=settings.auth_cache_s
            ).tenant_id
            check(req, settings)  # after the key: an unknown caller learns nothing about our limits
        return route(session=s, tenant=tenant, model=req.model, settings=settings, inflight=_inflight)


def _generate_request(r: Route, req: ChatCompletionRequest) -> Any:
    from service.grpc.pb import worker_pb2

    msg = worker_pb2.GenerateRequest(
        model_id=r.key,
        model_path=str(r.path),
        messages=[
            worker_pb2.Turn(
                role=ROLE.get(m.role, m.role),
                content=m.text(),
                tool_calls=[
                    worker_pb2.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
                    for c in m.tool_calls or []
                ],
                tool_call_id=m.tool_call_id or "",
            )
            for m in req.messages
        ],
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=req.stop or [],
        n=req.n or 1,
        cache_scope=r.tenant,
        adapter_id=r.adapter_key,
        adapter_path=r.adapter_path,
    )
    if req.max_new_tokens is not None:
        msg.max_new_tokens = req.max_new_tokens
    if req.seed is not None:
        msg.seed = req.seed
    if (grammar := grammar_of(req)) is not None:
        msg.grammar = grammar
    msg.logprobs = bool(req.logprobs)
    msg.top_logprobs = req.top_logprobs or 0
    for token, bias in (req.logit_bias or {}).items():
        msg.logit_bias[int(token)] = bias
    msg.presence_penalty = req.presence_penalty or 0.0
    msg.frequency_penalty = req.frequency_penalty or 0.0
    if req.tools:
        msg.tools = json.dumps([t.model_dump(exclude_none=True) for t in req.tools])
        choice = _choice(req)
        msg.tool_choice = json.dumps(choice or "auto")
        msg.parallel_tool_calls = req.parallel_tool_calls is not False
    return msg


async def complete(stream: ChatStream) -> tuple[list[dict[str, Any]], Finished]:
    """Read a whole stream: each reply's text, finish reason and reward, and the usage."""
    texts: dict[int, list[str]] = {i: [] for i in range(stream.n)}
    logprobs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(stream.n)}
    calls: dict[int, list[dict[str, Any]]] = {i: [] for i in range(stream.n)}
    ends: dict[int, tuple[str, float | None]] = {}
    async for item in stream:
        if isinstance(item, Finished):
            choices = [
                {
                    "index": i,
                    "text": "".join(texts[i]),
                    "finish_reason": ends.get(i, ("stop", None))[0],
                    "reward": ends.get(i, ("stop", None))[1],
                    "logprobs": logprobs[i] if stream.logprobs else None,
                    "tool_calls": calls[i] or None,
                }
                for i in range(stream.n)
            ]
            return choices, item
        texts[item.index].append(item.text)
        logprobs[item.index] += item.logprobs
        calls[item.index] += item.tool_calls
        if item.finish_reason is not None:
            ends[item.index] = (item.finish_reason, item.reward)
    raise WorkerFailedError("the inference worker ended the reply early; retry", code="worker_failed")
