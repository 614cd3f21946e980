"""/v1/fine_tuning/alpha/graders: OpenAI's grader endpoints — check that a grader can work, and run it
on one sample (with the row it would see), without starting a job.

/validate refuses what can be known wrong without running (a bad field, python that does not parse or
has no `grade`, a judge model that does not exist or is a reward model): 400 naming the field. /run
answers 200 whatever the sample does, with OpenAI's error flags: the tenant's python raising or
running out of its limits, a judge's reply that is no score or label, a judge that cannot be reached."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from fastapi import APIRouter

from rlhf_engine import graders
from service.api.deps import CallerDep, SettingsDep
from service.api.openapi import COMMON, errors
from service.db.session import session_scope
from service.errors import InvalidRequestError
from service.schemas import GraderRunRequest, GraderRunResponse, GraderValidateRequest, GraderValidateResponse
from service.services import embeddings, judges
from service.services.keys import Caller
from service.settings import Settings

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"], responses=errors(*COMMON))
_GRADING = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="grader")


def _parse(spec: dict[str, Any], caller: Caller, settings: Settings) -> graders.Grader:
    try:
        grader = graders.parse(spec)
    except graders.GraderError as e:
        raise InvalidRequestError(str(e), param=e.param) from None
    with session_scope(settings.db_url) as s:
        judges.check_models(session=s, tenant=caller.tenant_id, grader=grader, settings=settings)
    return grader


@router.post("/validate", response_model=GraderValidateResponse)
async def validate(body: GraderValidateRequest, caller: CallerDep, settings: SettingsDep) -> Any:
    """The grader back when it can work; else 400 naming the field."""
    await asyncio.to_thread(_parse, body.grader, caller, settings)
    return {"grader": body.grader}


@router.post("/run", response_model=GraderRunResponse)
async def run(body: GraderRunRequest, caller: CallerDep, settings: SettingsDep) -> Any:
    """The reward the grader gives `model_sample` for row `item`, each part's score, and what went wrong
    (`metadata.errors`); judges answer through the inference workers, python runs in the sandbox."""
    grader = await asyncio.to_thread(_parse, body.grader, caller, settings)
    if grader.score_models():
        raise InvalidRequestError(
            "grader: a score_model grader without input scores with a reward model loaded on a training "
            "worker; it runs inside jobs. Give it input messages to prompt a chat model as a judge here",
            param="grader",
        )
    item = body.item or {}
    try:
        graders.check_row(grader, item)
    except graders.GraderError as e:
        raise InvalidRequestError(str(e), param=e.param) from None
    loop = asyncio.get_running_loop()
    context = graders.Context(
        judge=judges.judge_on(loop, settings, caller.tenant_id),
        limits=settings.grader_limits(),
        embed=embeddings.embedder_on(loop, settings, caller.tenant_id),
    )
    # its own threads: a grader waits on judges that run on this loop and use the default executor, which
    # graders holding every one of its threads would starve (a deadlock under concurrent requests)
    result = await loop.run_in_executor(_GRADING, graders.run, grader, body.model_sample, item, context)
    return result.as_dict(grader, str(body.grader.get("type")))
