"""Alembic migrations, applied at start by every process that opens the database, one at a time.

PostgreSQL: a session-level advisory lock serialises concurrent starters (API server and workers
starting together); SQLite: an exclusive lock on a file beside the database.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from rlhf_engine import locks
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
def _lock(url: str, timeout_s: float) -> Iterator[None]:
    """One migrator at a time; both locks die with their holder (a file lock, a session's advisory lock)."""
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1] + ".migrate.lock")
        with locks.hold(path, what="the database migration lock", timeout_s=timeout_s):
            yield
        return
    with get_engine(url).connect() as conn:
        deadline = time.monotonic() + timeout_s
        while not conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": LOCK_ID}).scalar():
            if time.monotonic() > deadline:
                holder = conn.execute(
                    text(
                        "SELECT pid, application_name, client_addr FROM pg_stat_activity WHERE pid IN "
                        "(SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = :id AND granted)"
                    ),
                    {"id": LOCK_ID},
                ).first()
                raise locks.LockTimeoutError(
                    f"waited {timeout_s:.0f} s for the database migration lock (PostgreSQL advisory lock "
                    f"{LOCK_ID}, held by backend {tuple(holder) if holder else 'unknown'}); "
                    "another process is migrating: let it finish, or end its session (pg_terminate_backend)"
                )
            time.sleep(0.2)
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})


def migrate(url: str, *, timeout_s: float = 300.0) -> None:
    """Bring the database at `url` to the latest revision (waiting at most `timeout_s` for another
    migrator)."""
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    with _lock(url, timeout_s):
        command.upgrade(alembic_config(url), "head")
