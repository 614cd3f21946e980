"""A training step's model graders ask their judges (and the embedding model, for cosine similarity)
through the service: the worker that starts the step gives it the API's internal routes and the job's
secret in the environment (JUDGE_URL_ENV, EMBED_URL_ENV, JUDGE_TOKEN_ENV); this turns them into a
`graders.Judge` and a `graders.Embedder`. Standard library only (urllib): the step's process has no
HTTP client of its own to configure.

A failed call (the API down, a timeout, a refusal) gives every prompt of it a reply with the error, so
the samples get `model_grader_server_error` and the step goes on."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from rlhf_engine.graders import Embedder, EmbedReply, Judge, JudgeReply

JUDGE_URL_ENV = "RLHF_JUDGE_URL"
EMBED_URL_ENV = "RLHF_EMBED_URL"
JUDGE_TOKEN_ENV = "RLHF_JUDGE_TOKEN"
BATCH = 64  # prompts per call (the API's request-size limit holds 64 long prompts)
EMBED_BATCH = 256  # texts per call
TIMEOUT_S = 600.0


def from_environment() -> Judge | None:
    """The judge the service set up for this step, or None (run outside the service)."""
    url, token = os.environ.get(JUDGE_URL_ENV), os.environ.get(JUDGE_TOKEN_ENV)
    return http_judge(url, token) if url and token else None


def embedder_from_environment() -> Embedder | None:
    """The embedding model the service set up for this step, or None (run outside the service)."""
    url, token = os.environ.get(EMBED_URL_ENV), os.environ.get(JUDGE_TOKEN_ENV)
    return http_embedder(url, token) if url and token else None


def _post(url: str, token: str, body: dict[str, Any], timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    """The route's JSON answer, or None and why not."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return json.loads(resp.read()), ""
    except urllib.error.HTTPError as e:
        return None, f"the service answered {e.code}: {e.read()[:300].decode(errors='replace')}"
    except (OSError, ValueError) as e:
        return None, f"the service could not be asked: {e}"


def http_judge(url: str, token: str, timeout_s: float = TIMEOUT_S) -> Judge:
    def call(model: str, prompts: list[list[dict[str, str]]], sampling: dict[str, Any]) -> list[JudgeReply]:
        got, why = _post(url, token, {"model": model, "prompts": prompts, "sampling": sampling}, timeout_s)
        replies = got.get("replies") if got is not None else None
        if not isinstance(replies, list) or len(replies) != len(prompts):
            return [JudgeReply(None, error=why or "the service answered out of order") for _ in prompts]
        return [
            JudgeReply(
                r.get("text"),
                error=r.get("error"),
                prompt_tokens=int(r.get("prompt_tokens") or 0),
                completion_tokens=int(r.get("completion_tokens") or 0),
            )
            for r in replies
        ]

    def judge(model: str, prompts: list[list[dict[str, str]]], sampling: dict[str, Any]) -> list[JudgeReply]:
        out: list[JudgeReply] = []
        for i in range(0, len(prompts), BATCH):
            out += call(model, prompts[i : i + BATCH], sampling)
        return out

    return judge


def http_embedder(url: str, token: str, timeout_s: float = TIMEOUT_S) -> Embedder:
    def embed(texts: list[str]) -> EmbedReply:
        vectors: list[list[float]] = []
        tokens: list[int] = []
        model = ""
        for i in range(0, len(texts), EMBED_BATCH):
            part = texts[i : i + EMBED_BATCH]
            got, why = _post(url, token, {"input": part}, timeout_s)
            if got is None or len(got.get("vectors") or ()) != len(part):
                return EmbedReply(None, model=model, error=why or "the service answered out of order")
            model = str(got.get("model") or "")
            vectors += got["vectors"]
            tokens += [int(t) for t in got.get("tokens") or [0] * len(part)]
        return EmbedReply(vectors, model=model, tokens=tokens)

    return embed
