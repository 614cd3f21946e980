"""Helpers shared by the benchmark scripts (run as `python bench/<name>.py`, so this sits beside them)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, data: Any) -> Path:
    """bench/results/<name>-<local time>.json (results are committed: they are the evidence)."""
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class RawHTTP:
    """A minimal HTTP/1.1 client on one keep-alive connection (asyncio streams). Load generators use it
    so the measurement is the server's time, not a client library's: httpx costs about 1.5 ms of CPU
    per request here, on the same 2 cores as the server."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port = host, port
        self.auth = b"Authorization: Bearer " + key.encode() + b"\r\n"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; the body of a chunked reply is joined, and each chunk is
        handed to `on_chunk` as it arrives (for streamed replies: SSE)."""
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n".encode() + self.auth
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        for fresh in (self.writer is None, True):
            if fresh:
                await self.close()
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None and self.writer is not None
            self.writer.write(head + b"\r\n" + (body or b""))
            line = await self.reader.readline()
            if line:
                break
            if fresh:  # a new connection closed at once: the server is gone
                raise ConnectionError("the server closed the connection")
            # else the server had closed this idle keep-alive connection: reconnect and send again
        assert self.reader is not None  # the loop above always connects (mypy can't see it runs)
        status = int(line.split(b" ", 2)[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            elif name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        parts = []
        while size := int((await self.reader.readline()).strip() or b"0", 16):
            parts.append((await self.reader.readexactly(size + 2))[:-2])
            if on_chunk is not None:
                on_chunk(parts[-1])
        await self.reader.readline()
        return status, b"".join(parts)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class RawPool:
    """Idle `RawHTTP` connections to reuse; a request that finds none opens another (an open-loop
    generator must never wait for a connection, or it would hide the server's queueing)."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port, self.key = host, port, key
        self.idle: list[RawHTTP] = []
        self.opened = 0

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.idle:
            conn = self.idle.pop()
        else:
            conn = RawHTTP(self.host, self.port, self.key)
            self.opened += 1
        try:
            out = await conn.request(method, path, body)
        except BaseException:
            await conn.close()
            raise
        self.idle.append(conn)
        return out

    async def close(self) -> None:
        for conn in self.idle:
            await conn.close()
        self.idle.clear()
