"""The API's internal routes: what a training step asks of the service while it runs.

POST /internal/v1/jobs/{job_id}/judge: a batch of prompts for one of the job's judge models (a model
grader's `model`), answered through the inference workers for the job's tenant. The step presents the
job's own secret (made when the job was created, given to its steps in their environment); only while
the job is active, only the models its grader names. POST /internal/v1/jobs/{job_id}/embed: texts
embedded by the server's embedding model, for a grader's cosine similarity. Each request is counted on
the job (`cost.judge_requests`, `cost.judge_tokens`). Not part of the public schema."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Header
from pydantic import BaseModel, Field
from sqlalchemy.orm.attributes import flag_modified

from rlhf_engine import graders
from service.api.deps import SettingsDep
from service.db.models import Job
from service.db.session import session_scope
from service.errors import InvalidRequestError, NotFoundError, UnauthenticatedError
from service.jobs import states
from service.jobs.lifecycle import JUDGE_TOKEN
from service.services import embeddings, judges

router = APIRouter(prefix="/internal/v1", include_in_schema=False)
MAX_PROMPTS = 512


class EmbedRequest(BaseModel):
    input: list[str] = Field(min_length=1, max_length=MAX_PROMPTS)


class JudgeRequest(BaseModel):
    model: str = Field(max_length=255)
    prompts: list[list[dict[str, str]]] = Field(max_length=MAX_PROMPTS)
    sampling: dict[str, Any] = Field(default_factory=dict)


def _job_grader(settings: Any, job_id: str, token: str | None) -> tuple[str, graders.Grader]:
    """The job's tenant and grader, when `token` is the job's judge secret and the job is active."""
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        secret = (job.request or {}).get(JUDGE_TOKEN) if job is not None else None
        given = (token or "").removeprefix("Bearer ").strip()
        if job is None or not secret or not hmac.compare_digest(str(secret), given):
            raise UnauthenticatedError("not a judge token of this job", code="invalid_api_key")
        if job.status not in states.ACTIVE:
            raise NotFoundError(f"job {job_id} is {job.status}; its judges are closed", param="job_id")
        grader = (job.request.get("method") or {}).get("reinforcement", {}).get("grader")
        return job.tenant_id, graders.parse(grader, "method.reinforcement.grader")


def _count(settings: Any, job_id: str, requests: int, tokens: int) -> None:
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            return
        usage = dict(job.request.get("_judges") or {})
        usage["requests"] = int(usage.get("requests", 0)) + requests
        usage["tokens"] = int(usage.get("tokens", 0)) + tokens
        job.request = {**job.request, "_judges": usage}
        flag_modified(job, "request")


@router.post("/jobs/{job_id}/judge")
async def judge(
    job_id: str,
    body: JudgeRequest,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Any:
    tenant, grader = await asyncio.to_thread(_job_grader, settings, job_id, authorization)
    named = {model for _, model, _ in grader.judges()}
    if body.model not in named:
        raise InvalidRequestError(
            f"model: {body.model} is not one of this job's judges ({', '.join(sorted(named))})", param="model"
        )
    replies = await judges.ask(
        settings=settings, tenant=tenant, model=body.model, prompts=body.prompts, sampling=body.sampling
    )
    tokens = sum(r.prompt_tokens + r.completion_tokens for r in replies)
    await asyncio.to_thread(_count, settings, job_id, len(replies), tokens)
    return {
        "replies": [
            {
                "text": r.text,
                "error": r.error,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
            }
            for r in replies
        ]
    }


@router.post("/jobs/{job_id}/embed")
async def embed(
    job_id: str,
    body: EmbedRequest,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Any:
    tenant, grader = await asyncio.to_thread(_job_grader, settings, job_id, authorization)
    if not grader.embeds():
        raise InvalidRequestError("input: this job's grader compares no embeddings", param="input")
    got = await embeddings.embed(
        settings=settings, tenant=tenant, model=settings.embedding_model, inputs=body.input
    )
    await asyncio.to_thread(_count, settings, job_id, len(body.input), sum(got.tokens))
    return {"model": got.model, "vectors": got.vectors, "tokens": got.tokens}
