"""Alembic migrations, applied at start by every process that opens the database, one at a time.

PostgreSQL: a session-level advisory lock serialises concurrent starters (API server and workers
starting together); SQLite: an exclusive lock on a file beside the database.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from service.db.session import get_engine

logger = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
LOCK_ID = 0x726C6866  # "rlhf"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextlib.contextmanager
def _lock(url: str) -> Iterator[None]:
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1] + ".migrate.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": LOCK_ID})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})


def migrate(url: str) -> None:
    """Bring the database at `url` to the latest revision."""
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    with _lock(url):
        command.upgrade(alembic_config(url), "head")
