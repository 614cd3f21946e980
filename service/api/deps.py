"""Request dependencies: settings, a database session, the authenticated caller.

The dependencies are async so FastAPI does not hand each one to the thread pool (every hop costs a
thread wake-up, which under load is most of a request's latency): the session is created lazily (no
I/O), the key check runs in one worker thread (none when the key was verified within
`auth_cache_s`), and the route body in one more.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from service.db.session import new_session
from service.services.keys import Caller, authenticate, cached_caller
from service.settings import Settings


async def settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def session_dep(request: Request) -> AsyncIterator[Session]:
    session = new_session(request.app.state.settings.db_url)
    try:
        yield session
    finally:  # uncommitted work is rolled back; routes that write commit themselves
        session.close()  # returns the connection to the pool (a rollback round trip at most)


async def caller_dep(
    request: Request,
    session: Annotated[Session, Depends(session_dep)],
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    cache_s = request.app.state.settings.auth_cache_s
    if (caller := cached_caller(authorization, cache_s)) is not None:
        return caller  # verified moments ago: no database, no thread hop

    def check() -> Caller:
        try:
            return authenticate(session=session, authorization=authorization, cache_s=cache_s)
        finally:
            session.rollback()  # hands the connection back while the request waits for a route thread

    return await run_in_threadpool(check)


SettingsDep = Annotated[Settings, Depends(settings_dep)]
SessionDep = Annotated[Session, Depends(session_dep)]
CallerDep = Annotated[Caller, Depends(caller_dep)]
