"""The OpenAPI document tells the truth: each route declares the error statuses it can answer, with
OpenAI's envelope as their body, and none of FastAPI's 422 (a malformed request answers 400 here).

Routers declare what every route of theirs can answer (`errors(...)` on the APIRouter), routes add
their own (`responses=errors(404, 409)`); `openapi_document` drops the 422s FastAPI adds by itself.
`tests/service/test_openapi.py` checks the document, and a schemathesis run against a live server
checks that no answer carries an undeclared status.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.schemas import ErrorResponse

DESCRIPTIONS = {
    400: "invalid request, or the object's state does not allow it now: the message names the field and "
    "the fix",
    401: "missing or unknown API key",
    403: "the key may not do this",
    404: "no such object for this key",
    408: "the request body arrived too slowly (settings body_timeout_s, min_body_bytes_per_s)",
    409: "clashes with an earlier request (an Idempotency-Key reused with another body, a name taken)",
    413: "request body over this server's limit",
    429: "over a rate limit or quota; retry after Retry-After seconds",
    502: "an inference worker failed while answering; retry",
    503: "unavailable for now (no worker, model being prepared, a dependency down); retry after Retry-After "
    "seconds",
    504: "no answer in time",
}
# what every authenticated route can answer: a bad parameter or body, no key, a body too slow or over
# the limit, over the key's rate limit (when the operator sets one), the database unavailable
COMMON = (400, 401, 408, 413, 429, 503)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries for these error statuses, each with the envelope's schema."""
    return {s: {"model": ErrorResponse, "description": DESCRIPTIONS[s]} for s in statuses}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, without FastAPI's 422 responses and their schemas."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for operations in doc.get("paths", {}).values():
            for op in operations.values():
                op.get("responses", {}).pop("422", None)
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema
