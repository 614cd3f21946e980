"""A training step's model graders ask their judges through the service: the worker that starts the step
gives it the API's internal judge route and the job's secret in the environment (JUDGE_URL_ENV,
JUDGE_TOKEN_ENV); this turns them into a `graders.Judge`. Standard library only (urllib): the step's
process has no HTTP client of its own to configure.

A failed call (the API down, a timeout, a refusal) gives every prompt of it a reply with the error, so
the samples get `model_grader_server_error` and the step goes on."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from rlhf_engine.graders import Judge, JudgeReply

JUDGE_URL_ENV = "RLHF_JUDGE_URL"
JUDGE_TOKEN_ENV = "RLHF_JUDGE_TOKEN"
BATCH = 64  # prompts per call (the API's request-size limit holds 64 long prompts)
TIMEOUT_S = 600.0


def from_environment() -> Judge | None:
    """The judge the service set up for this step, or None (run outside the service)."""
    url, token = os.environ.get(JUDGE_URL_ENV), os.environ.get(JUDGE_TOKEN_ENV)
    return http_judge(url, token) if url and token else None


def http_judge(url: str, token: str, timeout_s: float = TIMEOUT_S) -> Judge:
    def call(model: str, prompts: list[list[dict[str, str]]], sampling: dict[str, Any]) -> list[JudgeReply]:
        body = json.dumps({"model": model, "prompts": prompts, "sampling": sampling}).encode()
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                got = json.loads(resp.read())["replies"]
        except urllib.error.HTTPError as e:
            why = f"the service answered {e.code}: {e.read()[:300].decode(errors='replace')}"
            return [JudgeReply(None, error=why) for _ in prompts]
        except (OSError, ValueError, KeyError) as e:
            return [JudgeReply(None, error=f"the service could not be asked: {e}") for _ in prompts]
        return [
            JudgeReply(
                r.get("text"),
                error=r.get("error"),
                prompt_tokens=int(r.get("prompt_tokens") or 0),
                completion_tokens=int(r.get("completion_tokens") or 0),
            )
            for r in got
        ]

    def judge(model: str, prompts: list[list[dict[str, str]]], sampling: dict[str, Any]) -> list[JudgeReply]:
        out: list[JudgeReply] = []
        for i in range(0, len(prompts), BATCH):
            out += call(model, prompts[i : i + BATCH], sampling)
        return out

    return judge
