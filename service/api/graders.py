"""/v1/fine_tuning/alpha/graders: OpenAI's grader endpoints — check that a grader can work, and run it
on one sample (with the training row it would see), without starting a job."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from rlhf_engine import graders
from service.api.deps import CallerDep
from service.api.openapi import COMMON, errors
from service.errors import InvalidRequestError
from service.schemas import GraderRunRequest, GraderRunResponse, GraderValidateRequest, GraderValidateResponse

router = APIRouter(prefix="/v1/fine_tuning/alpha/graders", tags=["graders"], responses=errors(*COMMON))


def _parse(spec: dict[str, Any]) -> graders.Grader:
    try:
        return graders.parse(spec)
    except graders.GraderError as e:
        raise InvalidRequestError(str(e), param=e.param) from None


@router.post("/validate", response_model=GraderValidateResponse)
def validate(body: GraderValidateRequest, caller: CallerDep) -> Any:
    """The grader back when it can work; else 400 naming the field (python graders: why not)."""
    _parse(body.grader)
    return {"grader": body.grader}


@router.post("/run", response_model=GraderRunResponse)
def run(body: GraderRunRequest, caller: CallerDep) -> Any:
    """The reward the grader gives `model_sample` for training row `item`, and each part's score."""
    grader = _parse(body.grader)
    if grader.score_models():
        raise InvalidRequestError(
            "grader: score_model graders score with a reward model loaded on a training worker; "
            "they run inside jobs. /run takes string_check, text_similarity and multi graders of "
            "those",
            param="grader",
        )
    item = body.item or {}
    try:
        graders.check_row(grader, item)
        result = graders.run(grader, body.model_sample, item)
    except graders.GraderError as e:
        raise InvalidRequestError(str(e), param=e.param) from None
    return result.as_dict(grader, str(body.grader.get("type")))
