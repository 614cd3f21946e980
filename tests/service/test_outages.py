"""Dependency outages: PostgreSQL unreachable when the API server starts, and lost while it serves.

The database is reached through a TCP proxy that the test cuts and restores (every connection
closed, the port refusing): the server still starts, `/healthz` answers 200 and `/readyz` 503, every
API call answers 503 `database_unavailable` with `Retry-After` (never a 500), and once the database
answers again the server migrates and serves without a restart — with nothing stored lost."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from rlhf_engine.runtime.distributed import free_port
from tests.service.conftest import SMALL_SFT, Stack

pytestmark = pytest.mark.timeout(180)


class Proxy:
    """127.0.0.1:`port` → PostgreSQL, with a switch: `down()` stops listening and closes every open
    connection (what clients see while the database restarts), `up()` listens again."""

    def __init__(self, target_port: int = 5432) -> None:
        self.port, self.target_port = free_port(), target_port
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def up(self) -> None:
        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        self.server = self._run(start())

    def down(self) -> None:
        async def stop() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            for w in list(self.writers):
                w.close()
            self.writers.clear()

        self._run(stop())


def _unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.headers["Retry-After"] == "1"
    assert (
        r.json()["error"]["code"] == "database_unavailable"
        and r.json()["error"]["type"] == "service_unavailable"
    )


def _until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not recovered in time"
        time.sleep(0.3)


def test_database_down_at_start_and_lost_while_serving(
    make_stack: Callable[..., Stack], new_pg: Callable[[], str]
) -> None:
    proxy = Proxy()
    url = new_pg().replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    stack = make_stack(database_url=url, retry_after_s=1)  # the proxy is not up: no database at start
    assert httpx.get(f"{stack.url}/healthz").status_code == 200
    assert httpx.get(f"{stack.url}/readyz").status_code == 503
    _unavailable(httpx.get(f"{stack.url}/v1/files", headers={"Authorization": "Bearer sk-any"}))
    _unavailable(
        httpx.post(
            f"{stack.url}/v1/fine_tuning/jobs", json=SMALL_SFT, headers={"Authorization": "Bearer sk-any"}
        )
    )

    proxy.up()  # the database is back: the server migrates and serves, no restart
    _until(lambda: httpx.get(f"{stack.url}/readyz").status_code == 200)
    key, unused = stack.key("alice"), stack.key("bob")
    with stack.client(key) as c, stack.client(unused) as fresh:
        job = c.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()
        assert job["status"] == "queued", job

        proxy.down()  # lost while serving: the pool's connections are dead, new ones refused
        _unavailable(c.get(f"/v1/fine_tuning/jobs/{job['id']}"))
        _unavailable(c.post("/v1/fine_tuning/jobs", json=SMALL_SFT))
        _unavailable(fresh.get("/v1/files"))  # a key not in the cache: authentication needs the database
        assert httpx.get(f"{stack.url}/readyz").status_code == 503
        assert httpx.get(f"{stack.url}/healthz").status_code == 200

        proxy.up()
        _until(lambda: c.get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 200)
        assert c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"
        assert [j["id"] for j in c.get("/v1/fine_tuning/jobs").json()["data"]] == [
            job["id"]
        ]  # nothing lost or added
    proxy.down()
