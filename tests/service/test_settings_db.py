"""Settings refuse unsafe production defaults; concurrent starts migrate once; CORS allow-list."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import inspect, text

from service.db.migrate import migrate
from service.db.session import get_engine
from service.settings import Settings
from tests.service.conftest import Stack


def test_production_refuses_development_defaults(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="production needs DATABASE_URL pointing at PostgreSQL"):
        Settings(environment="production", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="production needs REDIS_URL"):
        Settings(environment="production", data_dir=tmp_path, database_url="postgresql+psycopg://db/x")
    with pytest.raises(ValidationError, match="RLHF_INFERENCE_TOKEN"):
        Settings(
            environment="production",
            data_dir=tmp_path,
            database_url="postgresql+psycopg://db/x",
            redis_url="redis://r",
        )
    with pytest.raises(ValidationError, match="cors_origins"):
        Settings(
            environment="production",
            data_dir=tmp_path,
            database_url="postgresql+psycopg://db/x",
            redis_url="redis://r",
            inference_token="s3cret",
            cors_origins=["*"],
        )
    ok = Settings(
        environment="production",
        data_dir=tmp_path,
        database_url="postgresql+psycopg://db/x",
        redis_url="redis://r",
        inference_token="s3cret",
    )
    assert ok.db_url.startswith("postgresql")
    assert Settings(data_dir=tmp_path).db_url == f"sqlite:///{tmp_path / 'rlhf.db'}"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_starts_migrate_once(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'rlhf.db'}"
    else:
        import uuid

        import psycopg

        name = f"rlhf_mig_{uuid.uuid4().hex[:8]}"
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    errors: list[BaseException] = []

    def start() -> None:
        try:
            migrate(url)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    from alembic.script import ScriptDirectory

    from service.db.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine = get_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
    assert {
        "jobs",
        "job_events",
        "api_keys",
        "files",
        "cost_intervals",
        "uploaded_models",
        "inference_workers",
    } <= set(inspect(engine).get_table_names())
    if kind == "sqlite":
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    else:
        engine.dispose()
        get_engine.cache_clear()
        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_cors_allow_list(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(cors_origins=["https://chat.example.com"])
    with httpx.Client(base_url=stack.url) as c:
        pre = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        ok = c.options("/v1/fine_tuning/jobs", headers=pre | {"Origin": "https://chat.example.com"})
        assert ok.headers.get("access-control-allow-origin") == "https://chat.example.com"
        other = c.options("/v1/fine_tuning/jobs", headers=pre | {"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_the_api_process_never_imports_torch(tmp_path: Path) -> None:
    """The API server validates uploads, plans and prices jobs with torch (and transformers) unimportable."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tests.service.api_without_torch", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
