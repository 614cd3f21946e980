"""Domain errors and the one table that maps them to HTTP statuses, gRPC codes and stream error events.

Services raise these; REST, gRPC and SSE translate through `ERROR_TABLE` only (CONTRACTS.md §4).
The HTTP body is OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    kind = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class InvalidRequest(ServiceError):
    kind = "invalid_request_error"


class Unauthenticated(ServiceError):
    kind = "authentication_error"


class Forbidden(ServiceError):
    kind = "permission_error"


class NotFound(ServiceError):
    kind = "invalid_request_error"


class Conflict(ServiceError):
    kind = "invalid_request_error"


class TooLarge(ServiceError):
    kind = "invalid_request_error"


class SlowBody(ServiceError):
    """The request body arrived too slowly (a client trickling bytes holds a connection, never a thread)."""

    kind = "invalid_request_error"


class RateLimited(ServiceError):
    kind = "rate_limit_error"


class Unavailable(ServiceError):
    kind = "service_unavailable"


def database_unavailable(retry_after: int) -> Unavailable:
    """What REST and gRPC answer while the database cannot be reached (not the request's fault)."""
    return Unavailable(
        "the database is unavailable; retry shortly", code="database_unavailable", retry_after=retry_after
    )


class Timeout(ServiceError):
    kind = "timeout"


class WorkerFailed(ServiceError):
    """An inference worker failed while answering (not the client's doing)."""

    kind = "server_error"


# error class → (HTTP status, gRPC status code name)
ERROR_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    InvalidRequest: (400, "INVALID_ARGUMENT"),
    Unauthenticated: (401, "UNAUTHENTICATED"),
    Forbidden: (403, "PERMISSION_DENIED"),
    NotFound: (404, "NOT_FOUND"),
    Conflict: (409, "FAILED_PRECONDITION"),
    SlowBody: (408, "DEADLINE_EXCEEDED"),
    TooLarge: (413, "RESOURCE_EXHAUSTED"),
    RateLimited: (429, "RESOURCE_EXHAUSTED"),
    Unavailable: (503, "UNAVAILABLE"),
    Timeout: (504, "DEADLINE_EXCEEDED"),
    WorkerFailed: (502, "INTERNAL"),
}


def status_of(error: ServiceError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 400, "INVALID_ARGUMENT"


def from_value_error(e: ValueError) -> InvalidRequest:
    """A config dataclass's ValueError ("field: what to change") as a 400 naming that field."""
    message = str(e)
    head = message.split(":", 1)[0].split(" ", 1)[0]
    param = head if head.replace("_", "").replace(".", "").isalnum() and head.islower() else None
    return InvalidRequest(message, param=param)
