"""The API server: `create_app(settings)` builds it; `rlhf serve` runs it under uvicorn.

Every error leaves as OpenAI's envelope with the status of service.errors.ERROR_TABLE; FastAPI's
422 for a malformed body becomes a 400 naming the field. The process never imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from sqlalchemy import text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.answers import error_response
from service.api.openapi import openapi_document
from service.db.migrate import migrate
from service.db.session import DB_DOWN, get_engine, session_scope
from service.errors import (
    ForbiddenError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    ServiceError,
    SlowBodyError,
    TooLargeError,
    UnavailableError,
    database_unavailable,
)
from service.limits import Counter, RateLimit
from service.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (("." if out else "") + p)
    return out or "body"


class BodyGuard:
    """The request body: 413 for a declared body over the route's limit and for a streamed body that
    grows past it; 408 for one that trickles in — nothing for `idle_s`, or an average below
    `min_rate` bytes/s once `idle_s` has passed. Reading a body holds a coroutine, never a worker
    thread (FastAPI reads it before handing a request to the thread pool), and the deadline frees
    that too. Pure ASGI: cheaper per request than a BaseHTTPMiddleware."""

    def __init__(
        self, app: Any, *, limits: dict[str, int], default: int, idle_s: float, min_rate: int
    ) -> None:
        self.app, self.limits, self.default, self.idle_s, self.min_rate = (
            app,
            limits,
            default,
            idle_s,
            min_rate,
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = error_response(
                TooLargeError(
                    f"request body larger than this server's limit of {limit} bytes", code="too_large"
                )
            )
            await response(scope, receive, send)
            return
        seen, done, started = 0, False, time.monotonic()
        failure: ServiceError | None = None  # the body's fault: answered by us, whatever the app makes of it
        answered = False

        async def guarded() -> Any:
            nonlocal seen, done, failure
            if done:  # the body is in: what comes next is the client going away, however late
                return await receive()
            deadline = started + self.idle_s + seen / self.min_rate
            wait = min(self.idle_s, deadline - time.monotonic())
            try:
                if wait <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), wait)
            except asyncio.TimeoutError:
                failure = SlowBodyError(
                    f"request body too slow: {seen} bytes in {time.monotonic() - started:.0f} s; "
                    f"send it within {self.idle_s:g} s, at {self.min_rate} bytes/s or faster",
                    code="request_timeout",
                )
                raise failure from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > limit:
                    failure = TooLargeError(
                        f"request body larger than this server's limit of {limit} bytes", code="too_large"
                    )
                    raise failure
            else:
                done = True
            return message

        async def answer(message: Any) -> None:
            nonlocal answered
            if failure is None:
                await send(message)
            elif not answered:  # (FastAPI would answer a body that failed to arrive with a 400)
                answered = True
                await error_response(failure)(scope, receive, send)

        try:
            await self.app(scope, guarded, answer)
        except ServiceError:
            if failure is None:
                raise
            if not answered:
                answered = True
                await error_response(failure)(scope, receive, send)


class DatabaseGate:
    """503 with Retry-After on every /v1 route until the database has been migrated (a server that
    started while its database was down serves /healthz and /readyz, and retries the migrations)."""

    def __init__(self, app: Any, *, state: Any, retry_after: int) -> None:
        self.app, self.state, self.retry_after = app, state, retry_after

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.state.migrated and scope["path"].startswith("/v1/"):
            await error_response(database_unavailable(self.retry_after))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _migrate_until_done(state: Any, settings: Settings) -> None:
    while not state.migrated:
        time.sleep(min(settings.retry_after_s, 2))
        try:
            migrate(settings.db_url, timeout_s=settings.migrate_timeout_s)
        except DB_DOWN as e:
            logger.info("database still unavailable (%s); retrying", type(e).__name__)
            continue
        state.migrated = True
        logger.warning("database reachable again: migrated, serving")


CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console" / "dist"
# the console talks to this origin only and runs no inline code: a page that someone else's script got into
# could not send the key anywhere else
CONSOLE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self'; img-src 'self' data:; "
        b"style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class ConsoleFiles:
    """The built console under /ui/ (static files; hash routes, so index.html answers /ui/), with CSP
    headers."""

    def __init__(self, directory: Path) -> None:
        from starlette.staticfiles import StaticFiles

        self.files = StaticFiles(directory=directory, html=True)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + CONSOLE_HEADERS
            await send(message)

        await self.files(scope, receive, with_headers)


def mount_console(app: FastAPI, settings: Settings) -> None:
    """/ui/: the web console when it is built here; else a 404 that says how to build it."""
    from fastapi.responses import RedirectResponse

    directory = settings.console_dir or CONSOLE_DIR

    @app.get("/ui", include_in_schema=False)
    def ui_slash() -> Response:
        return RedirectResponse("/ui/")

    if (directory / "index.html").is_file():
        app.mount("/ui", ConsoleFiles(directory), name="console")
        return

    @app.get("/ui/{rest:path}", include_in_schema=False)
    def ui_missing(rest: str) -> JSONResponse:
        return error_response(
            NotFoundError(
                f"the web console is not built on this server ({directory} has no index.html): run "
                "`make console` (needs Node.js and npm), or set RLHF_CONSOLE_DIR",
                code="console_not_built",
            )
        )


def create_app(settings: Settings | None = None, *, run_migrations: bool = True) -> FastAPI:
    settings = settings or get_settings()
    migrated = True
    if run_migrations:
        try:
            migrate(settings.db_url, timeout_s=settings.migrate_timeout_s)
        except DB_DOWN as e:  # start anyway: 503 until the database answers, then migrate and serve
            logger.warning("database unavailable at start (%s); answering 503 and retrying", type(e).__name__)
            migrated = False
    # /docs and /redoc from assets shipped in a package, not a CDN (air-gapped clusters see them too)
    app = FastAPIOffline(
        title="rlhf-service",
        version="0.1.0",
        description="DeepSpeed-Chat's RLHF as a service: OpenAI-"
        "style fine-tuning jobs (SFT, reward model, PPO) and chat with the results.",
    )
    app.state.settings = settings
    app.state.started = time.time()
    app.state.migrated = migrated
    if not migrated:
        threading.Thread(
            target=_migrate_until_done, args=(app.state, settings), daemon=True, name="migrate-retry"
        ).start()

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )

    limits = {
        "/v1/files": settings.max_file_bytes + (1 << 20),
        "/v1/models": settings.max_model_bytes + (1 << 20),
    }
    app.add_middleware(
        BodyGuard,
        limits=limits,
        default=settings.max_body_bytes,
        idle_s=settings.body_timeout_s,
        min_rate=settings.min_body_bytes_per_s,
    )
    app.state.counter = Counter(settings)
    if settings.auth_cache_s > 0:
        from service.services.keys import listen_for_revocations

        listen_for_revocations(settings.redis_url)  # a revoked key stops working everywhere within a second
    if settings.rate_limit_per_minute:
        app.add_middleware(RateLimit, counter=app.state.counter, per_minute=settings.rate_limit_per_minute)
    app.add_middleware(
        DatabaseGate, state=app.state, retry_after=settings.retry_after_s
    )  # added last: runs first

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def database_down(request: Request, e: Exception) -> JSONResponse:
        logger.warning(
            "database unavailable on %s %s: %s", request.method, request.url.path, type(e).__name__
        )
        return error_response(database_unavailable(settings.retry_after_s))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": ("body",), "msg": "invalid request"}
        param = _loc(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        return error_response(InvalidRequestError(f"{param}: {msg}", param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            return error_response(NotFoundError(f"no route {request.method} {request.url.path}"))
        if e.status_code == 405:
            return error_response(
                MethodNotAllowedError(f"{request.method} is not allowed on {request.url.path}")
            )
        # (Starlette raises only these two itself; any other status keeps its own)
        return JSONResponse(
            ServiceError(str(e.detail)).envelope(), status_code=e.status_code, headers=e.headers
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(InternalError("internal error; it was logged"))

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> JSONResponse:
        if not app.state.migrated:
            return error_response(
                UnavailableError(
                    "database unavailable since start; migrations are retried",
                    code="database_unavailable",
                    retry_after=settings.retry_after_s,
                )
            )
        try:
            with get_engine(settings.db_url).connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as e:
            return error_response(
                UnavailableError(
                    f"database unavailable: {type(e).__name__}",
                    code="database_unavailable",
                    retry_after=settings.retry_after_s,
                )
            )
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        from service.services.keys import authenticate
        from service.telemetry import render

        with session_scope(settings.db_url) as session:
            if not settings.metrics_public:
                caller = authenticate(
                    session=session,
                    authorization=request.headers.get("authorization"),
                    cache_s=settings.auth_cache_s,
                )
                if not caller.operator:
                    return error_response(
                        ForbiddenError("/metrics needs an operator key (rlhf keys create --operator)")
                    )
            body, content_type = render(session)
        return PlainTextResponse(body, media_type=content_type)

    from service.api import (
        chat,
        checkpoints,
        embeddings,
        evals,
        files,
        graders,
        internal,
        jobs,
        models,
        responses,
    )

    app.include_router(chat.router)
    app.include_router(checkpoints.router)
    app.include_router(embeddings.router)
    app.include_router(evals.router)
    app.include_router(files.router)
    app.include_router(graders.router)
    app.include_router(internal.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(responses.router)
    mount_console(app, settings)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app
