"""Embeddings: the texts' vectors from a model we serve, routed to an inference worker like a chat (the
same routing, model cache and limits; rlhf_engine/chat/embed.py says how a causal LM embeds). Used by
`POST /v1/embeddings`, by the `cosine` text-similarity grader (`embedder_on`) and by training jobs'
graders through the internal embed route."""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

import grpc

from rlhf_engine import graders
from service.db.session import session_scope
from service.errors import InvalidRequestError, ServiceError, WorkerFailedError
from service.services import chat as chat_svc
from service.settings import Settings


@dataclass
class Embedded:
    model: str
    vectors: list[list[float]]
    tokens: list[int]  # each input's


def _route(settings: Settings, tenant: str, model: str) -> chat_svc.Route:
    with session_scope(settings.db_url) as s:
        return chat_svc.route(session=s, tenant=tenant, model=model, settings=settings, inflight={})


async def embed(
    *, settings: Settings, tenant: str, model: str, inputs: list[str] | list[list[int]]
) -> Embedded:
    """One unit vector per input from `model` as `tenant` sees it. Errors are `ServiceError`s (a bad input
    names `input[i]`; no worker is a 503)."""
    from service.grpc.pb import worker_pb2

    if len(inputs) > settings.embedding_max_inputs:
        raise InvalidRequestError(
            f"input: {len(inputs)} inputs, at most {settings.embedding_max_inputs} per request; split it",
            param="input",
        )
    r = chat_svc.cached_route(tenant=tenant, model=model, settings=settings, inflight={})
    if r is None:
        r = await asyncio.to_thread(_route, settings, tenant, model)
    texts = [i for i in inputs if isinstance(i, str)]
    message = worker_pb2.EmbedRequest(
        model_id=r.key,
        model_path=str(r.path),
        adapter_id=r.adapter_key,
        adapter_path=r.adapter_path,
        texts=texts,
        token_ids=[]
        if texts
        else [worker_pb2.TokenIds(ids=ids) for ids in inputs if not isinstance(ids, str)],
    )
    meta = (("x-worker-token", settings.inference_token),) if settings.inference_token else None
    busy = False
    for worker_id, address in r.workers:
        try:
            reply = await chat_svc.stub(address).Embed(
                message, timeout=settings.chat_timeout_s, metadata=meta
            )
        except grpc.aio.AioRpcError as e:
            busy = await chat_svc.refused(e, settings, worker_id, address) or busy
            continue
        if len(reply.vectors) != len(inputs):
            raise WorkerFailedError("the inference worker answered out of order", code="worker_failed")
        return Embedded(
            model=r.model_id,
            vectors=[list(v.values) for v in reply.vectors],
            tokens=[int(v.tokens) for v in reply.vectors],
        )
    raise chat_svc.none_took(busy, settings)


def embedder_on(loop: asyncio.AbstractEventLoop, settings: Settings, tenant: str) -> graders.Embedder:
    """A `graders.Embedder` (the server's embedding model, `RLHF_EMBEDDING_MODEL`) for code running in a
    thread beside `loop` (the API's)."""

    def call(texts: list[str]) -> graders.EmbedReply:
        model = settings.embedding_model
        coro = embed(settings=settings, tenant=tenant, model=model, inputs=texts)
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            got = future.result(timeout=settings.chat_timeout_s + 30)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return graders.EmbedReply(None, model=model, error="timeout: the embedding model did not answer")
        except ServiceError as e:
            return graders.EmbedReply(None, model=model, error=f"{e.code or type(e).__name__}: {e.message}")
        return graders.EmbedReply(got.vectors, model=model, tokens=got.tokens)

    return call
