"""What can go wrong with a chat request, as domain exceptions (the service maps them to statuses).

Each carries `param` (the request field at fault, or None) and `code` (rlhf_engine.errors.FieldError),
so HTTP, gRPC and the terminal report the same message. The inference worker sends the code with its
gRPC status; the API answers 400 for `ChatRequestError` and `ContextLengthExceededError`, 502 for
`ModelLoadError` and `GenerationFailedError`, and for `GeneratorBusyError` tries the next worker, then
answers 503 `busy` with Retry-After (also 503 for `ModelNotReadyError` and `GeneratorStoppedError`).
"""

from __future__ import annotations

from typing import Any

from rlhf_engine.errors import FieldError


class ChatError(FieldError):
    code = "chat_error"

    def __init__(self, message: str, *, param: str | None = None, **data: Any) -> None:
        super().__init__(message, param=param)
        self.data = data  # what the message says, as numbers (e.g. prompt_tokens, context_len)


class ChatRequestError(ChatError, ValueError):
    """A parameter out of range or a conversation the model cannot take."""

    code = "invalid_request"


class ContextLengthExceededError(ChatRequestError):
    code = "context_length_exceeded"


class ModelLoadError(ChatError, ValueError):
    """The model directory cannot be served (missing, not a causal LM, pickled weights, …)."""

    code = "model_load_error"


class ModelNotReadyError(ChatError):
    """The model is being prepared (a bundled model built on first use); retry shortly."""

    code = "model_not_ready"


class GeneratorBusyError(ChatError):
    """The request queue is full; retry later."""

    code = "engine_busy"


class GeneratorStoppedError(ChatError):
    """The engine was closed (or failed) before the request finished."""

    code = "engine_stopped"


class GenerationFailedError(ChatError):
    """The model raised while generating; the request ends with this error."""

    code = "generation_failed"
