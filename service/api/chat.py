"""POST /v1/chat/completions: OpenAI's chat protocol, streamed over SSE or answered whole.

The request is checked and accepted by a worker before the response starts, so a bad parameter, an
unknown model or no worker is a plain 4xx/503. Once streaming, a failure is an error event followed
by `data: [DONE]`; a client that disconnects cancels the worker's generation. Chunks are the
`ChatCompletionChunk` schema, written as JSON directly (one per token: the relay's cost per token
competes with generation for the CPU).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response, StreamingResponse

from service.api.deps import SettingsDep
from service.api.openapi import COMMON, errors
from service.errors import ServiceError
from service.limits import check_chat_tokens, count_chat_tokens
from service.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Usage,
)
from service.services import chat as svc

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/chat", tags=["chat"], responses=errors(*COMMON))


@router.post(
    "/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "chat.completion, or SSE chunks (chat.completion.chunk) ending in data: [DONE]",
        },
        **errors(404, 502, 503, 504),
    },
)
async def chat_completions(
    body: ChatCompletionRequest,
    settings: SettingsDep,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Any:
    counter = request.app.state.counter
    await check_chat_tokens(counter, settings, authorization)  # (both return at once when the limit is off)
    stream = await svc.open_chat(settings=settings, req=body, authorization=authorization)

    close = closer(stream, request, settings, authorization)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSE(sse_chunks(stream, include_usage=include_usage), on_close=close)
    whole = await read_whole(stream, request, close)
    if whole is None:
        return Response(status_code=499)
    choices, done = whole
    body_out = ChatCompletion(
        id=stream.id,
        created=stream.created,
        model=stream.model,
        choices=[
            ChatChoice(
                index=c["index"],
                message=AssistantMessage(
                    content=c["text"] if c["text"] or not c["tool_calls"] else None,
                    tool_calls=c["tool_calls"],
                ),
                finish_reason=_finish(c["finish_reason"]),
                reward=c["reward"],
                logprobs=None if c["logprobs"] is None else ChoiceLogprobs(content=c["logprobs"]),
            )
            for c in choices
        ],
        usage=_usage(done),
    )
    return Response(body_out.model_dump_json(), media_type="application/json")


def closer(
    stream: svc.ChatStream, request: Request, settings: Any, authorization: str | None
) -> Callable[[], Awaitable[None]]:
    """What ends a reply however it ended (done, failed, the client gone): stop generating, and charge the
    key's per-minute token count what was generated."""

    async def close() -> None:
        stream.cancel()
        await count_chat_tokens(request.app.state.counter, settings, authorization, stream.take_tokens())

    return close


async def read_whole(
    stream: svc.ChatStream, request: Request, close: Callable[[], Awaitable[None]]
) -> tuple[list[dict[str, Any]], svc.Finished] | None:
    """Every reply whole (and `close` run); None when the client left first (generation stopped)."""
    whole = asyncio.ensure_future(svc.complete(stream))
    try:
        while not (await asyncio.wait({whole}, timeout=0.5))[0]:
            if await request.is_disconnected():  # nobody will read the answer: stop generating it
                whole.cancel()
                return None
        return whole.result()
    finally:
        await close()


class SSE(StreamingResponse):
    """text/event-stream that always runs `on_close` when the response ends — also when the client
    disconnected mid-stream, where the body generator is abandoned without being closed."""

    def __init__(self, content: AsyncIterator[bytes], *, on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def _finish(reason: str | None) -> Any:
    return reason if reason in ("stop", "length", "tool_calls") else None


def _usage(f: svc.Finished) -> Usage:
    return Usage(
        prompt_tokens=f.prompt_tokens,
        completion_tokens=f.completion_tokens,
        total_tokens=f.prompt_tokens + f.completion_tokens,
    )


async def sse_chunks(stream: svc.ChatStream, *, include_usage: bool) -> AsyncIterator[bytes]:
    """chat.completion.chunk events; an error event if the stream fails; always `[DONE]` last."""
    head = {
        "id": stream.id,
        "object": "chat.completion.chunk",
        "created": stream.created,
        "model": stream.model,
        "system_fingerprint": None,
    }
    tail = {"usage": None} if include_usage else {}

    def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return (
            b"data: "
            + json.dumps(head | {"choices": choices} | tail | extra, separators=(",", ":")).encode()
            + b"\n\n"
        )

    try:
        yield frame(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "finish_reason": None,
                    "logprobs": None,
                }
                for i in range(stream.n)
            ]
        )
        async for item in stream:
            if isinstance(item, svc.Finished):
                if include_usage:
                    yield frame([], usage=_usage(item).model_dump())
                break
            if item.tool_calls:  # each call whole, then the finishing chunk (OpenAI sends the end alone)
                calls = [{"index": k} | call for k, call in enumerate(item.tool_calls)]
                yield frame(
                    [
                        {
                            "index": item.index,
                            "delta": {"tool_calls": calls},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ]
                )
            choice = {
                "index": item.index,
                "delta": {"content": item.text} if item.text else {},
                "finish_reason": _finish(item.finish_reason),
                "logprobs": {"content": item.logprobs, "refusal": None} if stream.logprobs else None,
            }
            if item.reward is not None:
                choice["reward"] = item.reward
            yield frame([choice])
    except ServiceError as e:  # after the headers: an error event, then the end
        yield b"event: error\ndata: " + json.dumps(e.envelope()).encode() + b"\n\n"
    except Exception:
        logger.exception("chat stream %s failed", stream.id)
        yield (
            b"event: error\ndata: "
            + json.dumps(
                {
                    "error": {
                        "message": "the chat stream failed; it was logged",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
            ).encode()
            + b"\n\n"
        )
    yield b"data: [DONE]\n\n"
