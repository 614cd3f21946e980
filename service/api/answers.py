"""Every error answer the HTTP API gives, built in one place from `service.errors.ERROR_TABLE`: the
table's status, OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, `Retry-After`
when the error has one (and `WWW-Authenticate` on a 401). Routes, middlewares (body limits, rate
limits, the database gate) and the exception handlers all answer through `error_response`."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from service.errors import ServiceError, UnauthenticatedError, status_of


def error_response(e: ServiceError, *, headers: dict[str, str] | None = None) -> JSONResponse:
    """A domain error as the client sees it (`headers`: more to send, e.g. the rate-limit counters)."""
    status, _ = status_of(e)
    out = dict(headers or {})
    if e.retry_after:
        out["Retry-After"] = str(e.retry_after)
    if isinstance(e, UnauthenticatedError):
        out["WWW-Authenticate"] = "Bearer"
    return JSONResponse(e.envelope(), status_code=status, headers=out or None)
