"""POST /v1/embeddings: OpenAI's embeddings of one or many texts by a model we serve (the mean of its last
hidden states, normalised: rlhf_engine/chat/embed.py), answered by the inference workers like a chat.
`encoding_format: base64` (what the official SDK asks for) is little-endian float32, base64-encoded;
`dimensions` keeps the first n components and normalises them again."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.deps import CallerDep, SettingsDep
from service.api.openapi import COMMON, errors
from service.errors import InvalidRequestError
from service.limits import check_chat_tokens, count_chat_tokens
from service.schemas import EmbeddingList, EmbeddingObject, EmbeddingRequest, EmbeddingUsage
from service.services import embeddings

router = APIRouter(prefix="/v1", tags=["embeddings"], responses=errors(*COMMON))


def _shorten(vector: list[float], dimensions: int | None) -> list[float]:
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in head)) or 1.0
    return [x / norm for x in head]


@router.post("/embeddings", response_model=EmbeddingList, responses=errors(404, 502, 503, 504))
async def create_embeddings(
    body: EmbeddingRequest, caller: CallerDep, settings: SettingsDep, request: Request
) -> Any:
    inputs = body.inputs()
    if not inputs:
        raise InvalidRequestError("input: give at least one text to embed", param="input")
    given: list[Any] = list(inputs)
    for i, text in enumerate(given):
        where = f"input[{i}]" if len(inputs) > 1 else "input"
        if isinstance(text, list) and any(not 0 <= t < 2**31 for t in text):
            raise InvalidRequestError(
                f"{where}: token ids are integers from 0 to the vocabulary's size", param=where
            )
        if isinstance(text, str) and len(text) > settings.chat_max_message_chars:
            raise InvalidRequestError(
                f"input[{i}]: longer than this server's limit of "
                f"{settings.chat_max_message_chars} characters",
                param=f"input[{i}]",
            )
    authorization = request.headers.get("authorization")
    counter = request.app.state.counter
    await check_chat_tokens(counter, settings, authorization)
    got = await embeddings.embed(settings=settings, tenant=caller.tenant_id, model=body.model, inputs=inputs)
    await count_chat_tokens(counter, settings, authorization, sum(got.tokens))
    width = len(got.vectors[0]) if got.vectors else 0
    if body.dimensions is not None and body.dimensions > width:
        raise InvalidRequestError(
            f"dimensions: {body.dimensions} is above the {width} dimensions of {body.model}'s embeddings",
            param="dimensions",
        )
    data = []
    for i, vector in enumerate(got.vectors):
        v = _shorten(vector, body.dimensions)
        value: list[float] | str = (
            base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            if body.encoding_format == "base64"
            else v
        )
        data.append(EmbeddingObject(index=i, embedding=value))
    tokens = sum(got.tokens)
    out = EmbeddingList(
        data=data, model=got.model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )
    return Response(out.model_dump_json(), media_type="application/json")
