"""What can go wrong with a chat request, as domain exceptions (the service maps them to statuses).

Each carries `param` (the request field at fault, or None) and `code`, so HTTP, gRPC and the
terminal report the same message: 400 / INVALID_ARGUMENT for `InvalidRequest`, 429 /
RESOURCE_EXHAUSTED for `EngineBusy`, 503 / UNAVAILABLE for `EngineStopped`, and an error event in a
stream for `GenerationFailed`.
"""

from __future__ import annotations

from typing import Any


class ChatError(Exception):
    code = "chat_error"

    def __init__(self, message: str, *, param: str | None = None, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.data = data


class InvalidRequest(ChatError, ValueError):
    """A parameter out of range or a conversation the model cannot take."""

    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelLoadError(ChatError, ValueError):
    """The model directory cannot be served (missing, not a causal LM, pickled weights, …)."""

    code = "model_load_error"


class ModelNotReady(ChatError):
    """The model is being prepared (a bundled model built on first use); retry shortly."""

    code = "model_not_ready"


class EngineBusy(ChatError):
    """The request queue is full; retry later."""

    code = "engine_busy"


class EngineStopped(ChatError):
    """The engine was closed (or failed) before the request finished."""

    code = "engine_stopped"


class GenerationFailed(ChatError):
    """The model raised while generating; the request ends with this error."""

    code = "generation_failed"
