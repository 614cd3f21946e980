"""The Responses API: a chat turn in another envelope. A response request becomes a chat request (the same
checks, routing, engine, limits and token accounting as /v1/chat/completions: `service.services.chat`),
its reply becomes a response object, and with `store` (the default) the response is kept per tenant so
`GET /v1/responses/{id}` returns it and `previous_response_id` continues its conversation.

Stored responses are bounded per tenant (`RLHF_RESPONSES_MAX_STORED`: the oldest go first). OpenAI does
not carry `instructions` over to a continuation, and neither do we: a stored conversation holds the turns
and replies, not the instructions.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.db.models import StoredResponse
from service.errors import InvalidRequestError, NotFoundError, ServiceError
from service.schemas import (
    ChatCompletionRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    IncompleteDetails,
    InputMessage,
    OutputMessage,
    OutputText,
    ResponseCreateRequest,
    ResponseObject,
    ResponseUsage,
)
from service.settings import Settings

ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


@dataclass
class Turn:
    """A response request as a chat: the conversation and where its parts came from."""

    chat: ChatCompletionRequest
    conversation: list[dict[str, Any]]  # the previous response's turns and this input (no instructions)
    inputs: int  # turns of this request's own input (the last of `conversation`)
    offset: int  # chat messages before the input (instructions, the previous conversation)

    def error(self, e: ServiceError) -> ServiceError:
        """A chat error in the Responses API's terms: `messages[k]` is `input[k - offset]` (or the previous
        response's conversation), `max_tokens` is `max_output_tokens`."""
        param = e.param or ""
        message = e.message
        m = re.match(r"messages\[(\d+)\]", param)
        if m:
            k = int(m.group(1))
            where = f"input[{k - self.offset}]" if k >= self.offset else "previous_response_id"
            if where == "previous_response_id" and k == 0 and self.chat.messages[0].role == "system":
                where = "instructions"
            new = where + param[m.end() :] if where.startswith("input") else where
            message, param = message.replace(param, new, 1), new
        elif param == "messages":
            message, param = re.sub(r"^messages\b", "input", message), "input"
        elif param in ("max_tokens", "max_completion_tokens"):
            message, param = message.replace(param, "max_output_tokens"), "max_output_tokens"
        elif param.startswith("tools[") and ".function" in param:
            new = param.replace(".function", "", 1)
            message, param = message.replace(param, new), new
        elif param.startswith("response_format"):
            new = "text.format" + param.removeprefix("response_format").replace(".json_schema", "", 1)
            message, param = message.replace(param, new), new
        if param == (e.param or ""):
            return e
        return type(e)(message, param=param, code=e.code, retry_after=e.retry_after)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def parse_input(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` as chat turns; anything else is a 400 naming `input[i]…`."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not given:
        raise InvalidRequestError("input: give a text or at least one message", param="input")
    turns: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "function_call":
            call = _call_item(item, where)
            if turns and turns[-1]["role"] == "assistant" and turns[-1].get("tool_calls"):
                turns[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        if kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequestError(
                    f"{where}.call_id: name the call this answers", param=f"{where}.call_id"
                )
            if not isinstance(output, str):
                raise InvalidRequestError(f"{where}.output: must be a string", param=f"{where}.output")
            turns.append({"role": "tool", "content": output, "tool_call_id": call_id})
            continue
        if kind != "message":
            raise InvalidRequestError(
                f"{where}.type: {kind!r} is not supported here; give messages {{role, content}}, "
                "function_call or function_call_output",
                param=f"{where}.type",
            )
        role = item.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"{where}.role: {role!r} is not one of {', '.join(ROLES)}", param=f"{where}.role"
            )
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise InvalidRequestError(
                        f"{where}.content[{j}].type: {kind!r} is not supported; only text parts "
                        "(input_text, output_text)",
                        param=f"{where}.content[{j}].type",
                    )
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError(
                        f"{where}.content[{j}].text: must be a string", param=f"{where}.content[{j}].text"
                    )
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"{where}.content: give a text or a list of text parts", param=f"{where}.content"
            )
        turns.append({"role": role, "content": content})
    return turns


def _call_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    name, arguments, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
    if not isinstance(name, str) or not isinstance(arguments, str) or not isinstance(call_id, str):
        raise InvalidRequestError(
            f"{where}: a function_call needs call_id, name and arguments (strings)", param=where
        )
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tools(req: ResponseCreateRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    """The Responses API's flat function tools and tool_choice in chat's shape."""
    tools = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.get("type") != "function":
                raise InvalidRequestError(
                    f"tools[{i}].type: {t.get('type')!r}: only function tools are supported here",
                    param=f"tools[{i}].type",
                )
            fn = {k: v for k, v in t.items() if k in ("name", "description", "parameters", "strict")}
            tools.append({"type": "function", "function": fn})
    choice: Any = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice


def _response_format(req: ResponseCreateRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.name is None:
        raise InvalidRequestError(
            "text.format.name: required with type json_schema", param="text.format.name"
        )
    spec: dict[str, Any] = {"name": fmt.name, "strict": fmt.strict}
    if fmt.json_schema is not None:
        spec["schema"] = fmt.json_schema
    if fmt.description is not None:
        spec["description"] = fmt.description
    return {"type": "json_schema", "json_schema": spec}


def prepare(*, session: Session, tenant: str, req: ResponseCreateRequest) -> Turn:
    """The chat turn a response request asks for (the previous response read for `tenant` only: another
    tenant's, or one not stored, is a 404 naming `previous_response_id`)."""
    name = req.unsupported()
    if name:
        raise InvalidRequestError(
            f"{name}: not supported by this server; remove it", param=name, code="unsupported_parameter"
        )
    turns = parse_input(req.input)
    before: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        prev = _stored(session, tenant, req.previous_response_id, param="previous_response_id")
        before = list(prev.conversation)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    tools, choice = _tools(req)
    fields: dict[str, Any] = {
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": req.parallel_tool_calls,
        "model": req.model,
        "messages": system + before + turns,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "response_format": _response_format(req),
    }
    try:
        chat = ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:  # a format the chat contract refuses (its fields are checked there)
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise InvalidRequestError(f"{where}: {first['msg']}", param=where) from None
    turn = Turn(chat=chat, conversation=before + turns, inputs=len(turns), offset=len(system) + len(before))
    return turn


def _stored(session: Session, tenant: str, response_id: str, *, param: str) -> StoredResponse:
    row = session.scalars(
        select(StoredResponse).where(StoredResponse.id == response_id, StoredResponse.tenant_id == tenant)
    ).first()
    if row is None:
        raise NotFoundError(
            f"{param}: no stored response {response_id!r} (responses made with store: false are not kept)",
            param=param,
            code="response_not_found",
        )
    return row


def response_object(
    *,
    req: ResponseCreateRequest,
    response_id: str,
    message_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    reward: float | None = None,
    status: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> ResponseObject:
    """The response object of a finished (or, with `status`, a starting) turn: its message (when it wrote
    text, or made no call) and its function calls."""
    done = status is None
    incomplete = finish_reason == "length"
    state = status or ("incomplete" if incomplete else "completed")
    output: list[OutputMessage | FunctionCallItem] = []
    if done and (text or not tool_calls):
        output.append(
            OutputMessage(
                id=message_id,
                status="incomplete" if incomplete else "completed",
                content=[OutputText(text=text)],
            )
        )
    for call in tool_calls or [] if done else []:
        output.append(
            FunctionCallItem(
                id="fc_" + call["id"].removeprefix("call_"),
                call_id=call["id"],
                name=call["function"]["name"],
                arguments=call["function"]["arguments"],
            )
        )
    text_field = (
        {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}
        if req.text and req.text.format
        else {"format": {"type": "text"}}
    )
    return ResponseObject(
        id=response_id,
        created_at=created,
        status=state,  # type: ignore[arg-type]
        model=model,
        output=output,
        usage=ResponseUsage(
            input_tokens=prompt_tokens,
            output_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        if done
        else None,
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if done and incomplete else None,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        tools=req.tools or [],
        tool_choice=req.tool_choice if isinstance(req.tool_choice, str) else "auto",
        parallel_tool_calls=req.parallel_tool_calls is not False,
        temperature=req.temperature if req.temperature is not None else 1.0,
        top_p=req.top_p if req.top_p is not None else 1.0,
        previous_response_id=req.previous_response_id,
        store=req.store,
        metadata=req.metadata or {},
        text=text_field,
        user=req.user,
        reward=reward,
    )


def store(
    *,
    session: Session,
    tenant: str,
    body: ResponseObject,
    turn: Turn,
    reply: str,
    settings: Settings,
    tool_calls: list[dict[str, Any]] | None = None,
) -> None:
    """Keep a finished response (and drop the tenant's oldest beyond the bound)."""
    said: dict[str, Any] = {"role": "assistant", "content": reply}
    if tool_calls:
        said["tool_calls"] = tool_calls
    session.add(
        StoredResponse(
            id=body.id,
            tenant_id=tenant,
            body=body.model_dump(mode="json"),
            conversation=[*turn.conversation, said],
            inputs=turn.inputs,
        )
    )
    session.flush()
    count = session.scalar(select(func.count()).where(StoredResponse.tenant_id == tenant)) or 0
    extra = count - settings.responses_max_stored
    if extra > 0:
        oldest = select(StoredResponse.seq).where(StoredResponse.tenant_id == tenant)
        cut = list(session.scalars(oldest.order_by(StoredResponse.seq).limit(extra)))
        session.execute(delete(StoredResponse).where(StoredResponse.seq.in_(cut)))


def get(*, session: Session, tenant: str, response_id: str) -> dict[str, Any]:
    return dict(_stored(session, tenant, response_id, param="response_id").body)


def remove(*, session: Session, tenant: str, response_id: str) -> None:
    session.delete(_stored(session, tenant, response_id, param="response_id"))


def input_items(
    *, session: Session, tenant: str, response_id: str, after: str | None, limit: int, order: str
) -> tuple[list[InputMessage | FunctionCallItem | FunctionCallOutputItem], bool]:
    """The response's own input turns (not its previous response's), as OpenAI's input items."""
    row = _stored(session, tenant, response_id, param="response_id")
    turns = row.conversation[-1 - row.inputs : -1]
    stem = response_id.removeprefix("resp_")[:24]
    items: list[InputMessage | FunctionCallItem | FunctionCallOutputItem] = []
    for i, t in enumerate(turns):
        if t["role"] == "tool":
            items.append(
                FunctionCallOutputItem(
                    id=f"fco_{stem}{i:04d}", call_id=t["tool_call_id"], output=t["content"]
                )
            )
        elif t.get("tool_calls"):
            items += [
                FunctionCallItem(
                    id=f"fc_{stem}{i:04d}{j:02d}",
                    call_id=c["id"],
                    name=c["function"]["name"],
                    arguments=c["function"]["arguments"],
                )
                for j, c in enumerate(t["tool_calls"])
            ]
        else:
            items.append(
                InputMessage(
                    id=f"msg_{stem}{i:04d}",
                    role=t["role"],
                    content=[
                        {
                            "type": "output_text" if t["role"] == "assistant" else "input_text",
                            "text": t["content"],
                        }
                    ],
                )
            )
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [it.id for it in items]
        if after not in ids:
            raise InvalidRequestError(f"after: {after!r} is not an item of this response", param="after")
        items = items[ids.index(after) + 1 :]
    return items[:limit], len(items) > limit


def now() -> int:
    return int(time.time())
