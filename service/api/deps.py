"""Request dependencies: settings, a database session, the authenticated caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from service.db.session import session_scope
from service.services.keys import Caller, authenticate
from service.settings import Settings


def settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def session_dep(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.settings.db_url) as session:
        yield session


def caller_dep(session: Annotated[Session, Depends(session_dep)],
               authorization: Annotated[str | None, Header()] = None) -> Caller:  # fmt: skip
    return authenticate(session=session, authorization=authorization)


SettingsDep = Annotated[Settings, Depends(settings_dep)]
SessionDep = Annotated[Session, Depends(session_dep)]
CallerDep = Annotated[Caller, Depends(caller_dep)]
