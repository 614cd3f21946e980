"""Domain errors and the one table that maps them to HTTP statuses, gRPC codes and stream error events.

Services raise these; REST (service/api/answers.py), gRPC and SSE translate through `ERROR_TABLE` only.
The HTTP body is OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from typing import Any

from rlhf_engine.errors import FieldError


class ServiceError(FieldError):
    kind = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class InvalidRequestError(ServiceError):
    kind = "invalid_request_error"


class UnauthenticatedError(ServiceError):
    kind = "authentication_error"


class ForbiddenError(ServiceError):
    kind = "permission_error"


class NotFoundError(ServiceError):
    kind = "invalid_request_error"


class MethodNotAllowedError(ServiceError):
    kind = "invalid_request_error"


class ConflictError(ServiceError):
    """A request that clashes with another (an Idempotency-Key reused with another body, a name taken)."""

    kind = "invalid_request_error"


class WrongStateError(InvalidRequestError):
    """The object's state does not allow this (cancel a finished job, delete a file a live job uses).

    A 400 as OpenAI answers it, not a 409: the official SDK retries 409s twice with backoff, and
    retrying cannot change a finished job's state. gRPC says FAILED_PRECONDITION."""

    kind = "invalid_request_error"


class TooLargeError(ServiceError):
    kind = "invalid_request_error"


class SlowBodyError(ServiceError):
    """The request body arrived too slowly (a client trickling bytes holds a connection, never a thread)."""

    kind = "invalid_request_error"


class RateLimitedError(ServiceError):
    kind = "rate_limit_error"


class UnavailableError(ServiceError):
    kind = "service_unavailable"


def database_unavailable(retry_after: int) -> UnavailableError:
    """What REST and gRPC answer while the database cannot be reached (not the request's fault)."""
    return UnavailableError(
        "the database is unavailable; retry shortly", code="database_unavailable", retry_after=retry_after
    )


class ServiceTimeoutError(ServiceError):
    kind = "timeout"


class InternalError(ServiceError):
    """A fault of ours (logged with its traceback; the client sees only that it happened)."""

    kind = "server_error"


class WorkerFailedError(ServiceError):
    """An inference worker failed while answering (not the client's doing)."""

    kind = "server_error"


# error class → (HTTP status, gRPC status code name)
ERROR_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    InvalidRequestError: (400, "INVALID_ARGUMENT"),
    UnauthenticatedError: (401, "UNAUTHENTICATED"),
    ForbiddenError: (403, "PERMISSION_DENIED"),
    NotFoundError: (404, "NOT_FOUND"),
    MethodNotAllowedError: (405, "UNIMPLEMENTED"),
    ConflictError: (409, "FAILED_PRECONDITION"),
    WrongStateError: (400, "FAILED_PRECONDITION"),
    SlowBodyError: (408, "DEADLINE_EXCEEDED"),
    TooLargeError: (413, "RESOURCE_EXHAUSTED"),
    RateLimitedError: (429, "RESOURCE_EXHAUSTED"),
    UnavailableError: (503, "UNAVAILABLE"),
    ServiceTimeoutError: (504, "DEADLINE_EXCEEDED"),
    WorkerFailedError: (502, "INTERNAL"),
    InternalError: (500, "INTERNAL"),
}


def status_of(error: ServiceError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 400, "INVALID_ARGUMENT"


def from_value_error(e: ValueError) -> InvalidRequestError:
    """A config dataclass's ValueError ("field: what to change") as a 400 naming that field."""
    message = str(e)
    head = message.split(":", 1)[0].split(" ", 1)[0]
    param = head if head.replace("_", "").replace(".", "").isalnum() and head.islower() else None
    return InvalidRequestError(message, param=param)
