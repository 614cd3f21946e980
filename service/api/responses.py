"""/v1/responses: OpenAI's Responses API for the models we serve — `client.responses.create`, `.stream`,
`.parse`, `.retrieve`, `.delete` and `.input_items.list` of the official SDK work unchanged.

A response is a chat turn in another envelope (service/services/responses.py): the request is checked and
accepted by an inference worker before the answer starts, exactly as a chat completion is. Streamed, the
answer is OpenAI's typed events — response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta…, response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed (or response.incomplete
when max_output_tokens cut it, or response.failed when the worker failed mid-answer).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.api.chat import SSE, closer, read_whole
from service.api.deps import CallerDep, SessionDep, SettingsDep
from service.api.jobs import Limit, respond
from service.api.openapi import COMMON, errors
from service.db.session import session_scope
from service.errors import ServiceError
from service.limits import check_chat_tokens
from service.pagination import paged
from service.schemas import ResponseCreateRequest, ResponseDeleted, ResponseInputItemList, ResponseObject
from service.services import chat as chat_svc
from service.services import responses as svc
from service.settings import Settings

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/responses", tags=["responses"], responses=errors(*COMMON))
Order = Annotated[Literal["asc", "desc"], Query(description="oldest first (asc) or newest first (desc)")]


def _prepare(settings: Settings, tenant: str, body: ResponseCreateRequest) -> svc.Turn:
    with session_scope(settings.db_url) as s:
        return svc.prepare(session=s, tenant=tenant, req=body)


def _store(
    settings: Settings, tenant: str, out: ResponseObject, turn: svc.Turn, reply: str, calls: list[Any] | None
) -> None:
    with session_scope(settings.db_url) as s:
        svc.store(
            session=s, tenant=tenant, body=out, turn=turn, reply=reply, settings=settings, tool_calls=calls
        )


@router.post(
    "",
    response_model=ResponseObject,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "the response, or SSE typed events (response.created … response.completed)",
        },
        **errors(404, 502, 503, 504),
    },
)
async def create_response(
    body: ResponseCreateRequest, caller: CallerDep, settings: SettingsDep, request: Request
) -> Any:
    authorization = request.headers.get("authorization")
    counter = request.app.state.counter
    await check_chat_tokens(counter, settings, authorization)
    turn = await asyncio.to_thread(_prepare, settings, caller.tenant_id, body)
    try:
        stream = await chat_svc.open_chat(settings=settings, req=turn.chat, tenant=caller.tenant_id)
    except ServiceError as e:
        raise turn.error(e) from None
    response_id, message_id = svc.new_id("resp"), svc.new_id("msg")
    created = svc.now()

    close = closer(stream, request, settings, authorization)

    def finished(
        text: str, reason: str | None, done: chat_svc.Finished, reward: float | None, calls: list[Any] | None
    ) -> ResponseObject:
        return svc.response_object(
            tool_calls=calls,
            req=body,
            response_id=response_id,
            message_id=message_id,
            created=created,
            model=stream.model,
            text=text,
            finish_reason=reason,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            reward=reward,
        )

    if body.stream:
        events = _events(
            stream, body, turn, settings, caller.tenant_id, response_id, message_id, created, finished
        )
        return SSE(events, on_close=close)
    whole = await read_whole(stream, request, close)
    if whole is None:
        return Response(status_code=499)
    choices, done = whole
    c = choices[0]
    out = finished(c["text"], c["finish_reason"], done, c["reward"], c["tool_calls"])
    if body.store:
        await asyncio.to_thread(_store, settings, caller.tenant_id, out, turn, c["text"], c["tool_calls"])
    return Response(out.model_dump_json(), media_type="application/json")


async def _events(
    stream: chat_svc.ChatStream,
    body: ResponseCreateRequest,
    turn: svc.Turn,
    settings: Settings,
    tenant: str,
    response_id: str,
    message_id: str,
    created: int,
    finished: Any,
) -> AsyncIterator[bytes]:
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    start = svc.response_object(
        req=body,
        response_id=response_id,
        message_id=message_id,
        created=created,
        model=stream.model,
        text="",
        finish_reason=None,
        prompt_tokens=0,
        completion_tokens=0,
        status="in_progress",
    ).model_dump(mode="json")
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    texts: list[str] = []
    opened = False  # the message item starts with its first text (a reply of only calls has none)

    def open_message() -> list[bytes]:
        nonlocal opened
        opened = True
        item = {
            "id": message_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            event("response.output_item.added", output_index=0, item=item),
            event("response.content_part.added", **where, part=part),
        ]

    try:
        reason, reward = None, None
        calls: list[Any] = []
        async for item in stream:
            if isinstance(item, chat_svc.Finished):
                text = "".join(texts)
                out = finished(text, reason, item, reward, calls)
                index = 0
                if out.output and out.output[0].type == "message":
                    for frame in [] if opened else open_message():
                        yield frame
                    message = out.output[0].model_dump(mode="json")
                    yield event("response.output_text.done", **where, text=text, logprobs=[])
                    yield event("response.content_part.done", **where, part=message["content"][0])
                    yield event("response.output_item.done", output_index=0, item=message)
                    index = 1
                for k, call in enumerate(out.output[index:], start=index):
                    done_item = call.model_dump(mode="json")
                    at = {"item_id": done_item["id"], "output_index": k}
                    yield event(
                        "response.output_item.added", output_index=k, item=done_item | {"arguments": ""}
                    )
                    yield event("response.function_call_arguments.delta", **at, delta=done_item["arguments"])
                    yield event(
                        "response.function_call_arguments.done",
                        **at,
                        name=done_item["name"],
                        arguments=done_item["arguments"],
                    )
                    yield event("response.output_item.done", output_index=k, item=done_item)
                if body.store:
                    await asyncio.to_thread(_store, settings, tenant, out, turn, text, calls or None)
                kind = "response.incomplete" if out.status == "incomplete" else "response.completed"
                yield event(kind, response=out.model_dump(mode="json"))
                return
            if item.text:
                for frame in [] if opened else open_message():
                    yield frame
                texts.append(item.text)
                yield event("response.output_text.delta", **where, delta=item.text, logprobs=[])
            if item.finish_reason is not None:
                reason, reward = item.finish_reason, item.reward
                calls += item.tool_calls
    except ServiceError as e:  # after the headers: response.failed with the error (nothing stored)
        failed = dict(start, status="failed", error={"code": e.code or e.kind, "message": e.message})
        yield event("response.failed", response=failed)
    except Exception:
        logger.exception("response stream %s failed", response_id)
        failed = dict(
            start,
            status="failed",
            error={"code": "server_error", "message": "the response failed; it was logged"},
        )
        yield event("response.failed", response=failed)


@router.get("/{response_id}", response_model=ResponseObject, responses=errors(404))
def get_response(response_id: str, caller: CallerDep, session: SessionDep) -> Any:
    return respond(
        ResponseObject.model_validate(
            svc.get(session=session, tenant=caller.tenant_id, response_id=response_id)
        )
    )


@router.delete("/{response_id}", response_model=ResponseDeleted, responses=errors(404))
def delete_response(response_id: str, caller: CallerDep, session: SessionDep) -> Any:
    svc.remove(session=session, tenant=caller.tenant_id, response_id=response_id)
    session.commit()
    return respond(ResponseDeleted(id=response_id))


@router.get("/{response_id}/input_items", response_model=ResponseInputItemList, responses=errors(404))
def list_input_items(
    response_id: str,
    caller: CallerDep,
    session: SessionDep,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "desc",
) -> Any:
    items, more = svc.input_items(
        session=session,
        tenant=caller.tenant_id,
        response_id=response_id,
        after=after,
        limit=limit,
        order=order,
    )
    return respond(paged(ResponseInputItemList, items, more))
