"""Model graders' judges: a chat model we serve, prompted once per sample through the inference workers
(the same routing, limits and continuous batching as `/v1/chat/completions`). Used by /graders/run in
the API process, by training jobs through the internal judge route, and by eval runs to sample the
model under evaluation (`ask` is the one way the service asks a model for whole replies).

A judge that cannot answer (no worker, a timeout, a bad prompt) gives a `JudgeReply` with the error,
never an exception: the sample gets OpenAI's `model_grader_server_error` flag and a score of 0."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from rlhf_engine import graders
from service.errors import InvalidRequestError, ServiceError
from service.schemas import ChatCompletionRequest, ChatMessage
from service.services import chat as chat_svc
from service.services import models as models_svc
from service.settings import Settings

MAX_CONCURRENT = 16  # one judge call's requests in flight at once (the workers batch them)


def is_reward_model(path: Path) -> bool:
    """A folder of ours holding a reward model (a value head: `…ForSequenceClassification`)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ())


def check_models(*, session: Session, tenant: str, grader: graders.Grader, settings: Settings) -> None:
    """Every model the grader names exists for this tenant and is of the right kind: a chat model for a
    judge, a reward model for a score_model without `input`; the server's embedding model for cosine
    similarity. 400 naming the grader's field otherwise."""

    def resolve(name: str, where: str) -> models_svc.ModelRef:
        return models_svc.resolve(
            session=session,
            tenant=tenant,
            name=name,
            models_dir=settings.models_dir,
            param=where,
            max_bytes=settings.max_model_bytes,
        )

    if grader.embeds():
        where, model = grader.embeds()[0], settings.embedding_model
        try:
            ref = resolve(model, where)
        except InvalidRequestError as e:
            raise InvalidRequestError(
                f"{where}: cosine embeds with this server's embedding model {model!r} "
                f"(RLHF_EMBEDDING_MODEL), which cannot be used: {e.message}; "
                "choose another evaluation_metric",
                param=where,
            ) from None
        if is_reward_model(ref.path):
            raise InvalidRequestError(
                f"{where}: this server's embedding model {model!r} (RLHF_EMBEDDING_MODEL) is a reward "
                "model; the operator must name a language model",
                param=where,
            )
    for where, model, kind in grader.judges():
        if is_reward_model(resolve(model, where).path):
            raise InvalidRequestError(
                f"{where}: {model} is a reward model (a value head), which scores but cannot answer a "
                f"prompt; a {kind} grader needs a chat model"
                + (
                    " — or drop `input` to score with the reward model directly"
                    if kind == "score_model"
                    else ""
                ),
                param=where,
            )


def _request(model: str, messages: list[dict[str, str]], sampling: dict[str, Any]) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model=model,
        messages=[ChatMessage(role=m["role"], content=m["content"]) for m in messages],  # type: ignore[arg-type]
        temperature=sampling.get("temperature"),
        top_p=sampling.get("top_p"),
        seed=sampling.get("seed"),
        max_completion_tokens=sampling.get("max_completion_tokens") or graders.DEFAULT_JUDGE_TOKENS,
    )


async def ask(
    *,
    settings: Settings,
    tenant: str,
    model: str,
    prompts: list[list[dict[str, str]]],
    sampling: dict[str, Any],
) -> list[graders.JudgeReply]:
    """Each prompt's reply from `model`, asked concurrently (the workers batch them)."""
    gate = asyncio.Semaphore(MAX_CONCURRENT)

    async def one(messages: list[dict[str, str]]) -> graders.JudgeReply:
        async with gate:
            try:
                req = _request(model, messages, sampling)
                chat_svc.check(req, settings)
                stream = await chat_svc.open_chat(settings=settings, req=req, tenant=tenant)
                choices, done = await chat_svc.complete(stream)
            except ServiceError as e:
                return graders.JudgeReply(None, error=f"{e.code or type(e).__name__}: {e.message}")
            except ValueError as e:  # a rendered prompt the chat schema refuses
                return graders.JudgeReply(None, error=f"invalid_prompt: {e}")
        return graders.JudgeReply(
            choices[0]["text"],
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            finish_reason=choices[0]["finish_reason"] or "",
        )

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def judge_on(loop: asyncio.AbstractEventLoop, settings: Settings, tenant: str) -> graders.Judge:
    """A `graders.Judge` for code running in a thread beside `loop` (the API's): each call hops onto the
    loop, where the chat routing lives."""

    def judge(
        model: str, prompts: list[list[dict[str, str]]], sampling: dict[str, Any]
    ) -> list[graders.JudgeReply]:
        coro = ask(settings=settings, tenant=tenant, model=model, prompts=prompts, sampling=sampling)
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout=settings.chat_timeout_s + 30)
        except concurrent.futures.TimeoutError:  # a judge that never answers is the samples' flag, not a 500
            future.cancel()
            why = f"timeout: the judge did not answer within {settings.chat_timeout_s + 30:.0f} s"
            return [graders.JudgeReply(None, error=why) for _ in prompts]

    return judge
