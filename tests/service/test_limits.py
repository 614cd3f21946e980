"""Limits and quotas: requests per key and minute across API processes (Redis) and on one process
without Redis (the database), streamed chat tokens per key, a tenant's live jobs and queued GPU-hours.
Over a limit: 429, OpenAI's rate_limit_error envelope, Retry-After; other keys are unaffected.

No test waits for a window to end: the window arithmetic (a rollover resets the counts, Retry-After is
the seconds left) runs on a manual clock; the live servers count in a window that never ends mid-test
(`NO_ROLLOVER_S`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from service.clock import ManualClock
from service.limits import Counter, RateLimit, rate_key, window
from service.settings import Settings
from tests.service.conftest import NO_ROLLOVER_S, SMALL_SFT, Stack

pytestmark = pytest.mark.timeout(120)


def test_fixed_windows_start_at_the_epoch_and_say_the_seconds_left() -> None:
    assert window(1_700_000_040.0, 60) == (28_333_334, 60)  # a window's first instant: all of it left
    assert window(1_700_000_070.2, 60) == (28_333_334, 30)  # 29.8 s left, rounded up
    assert window(1_700_000_099.9, 60) == (28_333_334, 1)  # never 0: Retry-After is at least 1
    assert window(1_700_000_100.0, 60) == (28_333_335, 60)  # the next window
    assert window(7.5, 10) == (0, 3)


@pytest.fixture(params=["redis", "database"])
def counted(request: pytest.FixtureRequest, tmp_path: Any) -> Settings:
    """Settings whose counts go to Redis or (without Redis) to a migrated SQLite database."""
    from service.db.migrate import migrate

    if request.param == "redis":
        url = request.getfixturevalue("scratch_redis")
        redis.Redis.from_url(url).flushdb()
        return Settings(data_dir=tmp_path, redis_url=url)
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'rlhf.db'}")
    migrate(settings.db_url)
    return settings


def test_a_window_rollover_resets_the_count(counted: Settings) -> None:
    clock = ManualClock(start=1_700_000_040.0)  # the first instant of a minute
    counter = Counter(counted, clock=clock)

    async def add(name: str, n: int = 1) -> tuple[int, int]:
        return await counter.add(name, n)

    async def run() -> None:
        assert await add("req:a") == (1, 60)
        clock.advance(45.5)
        assert await add("req:a", 2) == (3, 15)  # the same window: counted on, 14.5 s left → 15
        assert await add("req:b") == (1, 15)  # another name has its own count
        clock.advance(14.5)  # the window's end
        assert await add("req:a") == (1, 60)  # a new window: counted from zero
        assert await add("req:b", 0) == (0, 60)

    asyncio.run(run())


def test_the_middleware_refuses_until_the_window_ends(counted: Settings) -> None:
    """Over the limit → 429 with Retry-After = the seconds left in the window; the next window serves."""

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    clock = ManualClock(start=1_700_000_040.0)
    limited = RateLimit(ok, counter=Counter(counted, clock=clock), per_minute=2)
    alice, bob = {"Authorization": "Bearer sk-alice"}, {"Authorization": "Bearer sk-bob"}

    async def run() -> None:
        transport = httpx.ASGITransport(app=limited)
        async with httpx.AsyncClient(transport=transport, base_url="http://limits") as c:
            assert [(await c.get("/v1/models", headers=alice)).status_code for _ in range(2)] == [200, 200]
            clock.advance(20.25)
            r = await c.get("/v1/models", headers=alice)
            assert r.status_code == 429 and r.headers["Retry-After"] == "40"  # 39.75 s left, rounded up
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert (await c.get("/v1/models", headers=bob)).status_code == 200  # another key
            clock.advance(39.75)  # the window has ended
            r = await c.get("/v1/models", headers=alice)
            assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "1"

    asyncio.run(run())


def _limited(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 429, (r.status_code, r.text)
    assert 1 <= int(r.headers["Retry-After"]) <= NO_ROLLOVER_S
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["message"], err
    return dict(err)


@pytest.mark.parametrize("store", ["redis", "database"])
def test_requests_per_key_are_limited_across_api_processes(
    make_stack: Callable[..., Stack], new_pg: Callable[[], str], new_redis: Callable[[], str], store: str
) -> None:
    shared = {
        "database_url": new_pg(),
        "redis_url": new_redis() if store == "redis" else "",
        "rate_limit_per_minute": 5,
        "rate_window_s": NO_ROLLOVER_S,
    }
    a, b = make_stack(**shared), make_stack(**shared)  # two API processes' worth of apps, one database
    alice, bob = a.key("alice"), a.key("bob")
    with a.client(alice) as a1, b.client(alice) as b1, a.client(bob) as a2:
        answers = [
            a1.get("/v1/files"),
            b1.get("/v1/models"),
            a1.get("/v1/fine_tuning/jobs"),
            b1.get("/v1/files"),
            a1.get("/v1/files"),
        ]
        assert [r.status_code for r in answers] == [200] * 5
        assert [int(r.headers["x-ratelimit-remaining-requests"]) for r in answers] == [4, 3, 2, 1, 0]
        err = _limited(b1.get("/v1/files"))  # the 6th of this minute, on the other process
        assert err["code"] == "rate_limit_exceeded" and "5 requests per minute" in err["message"]
        _limited(a1.post("/v1/fine_tuning/jobs", json=SMALL_SFT))  # every route counts, nothing is created
        assert a2.get("/v1/files").status_code == 200  # another key is unaffected
        assert httpx.get(f"{a.url}/healthz").status_code == 200  # health checks are not limited
    from service.db.models import Job
    from service.db.session import session_scope

    with session_scope(a.settings.db_url) as session:
        assert session.query(Job).count() == 0  # the refused POST stored nothing


def test_streamed_chat_tokens_per_key(make_stack: Callable[..., Stack]) -> None:
    """Once a key's replies this minute reach RLHF_CHAT_TOKENS_PER_MINUTE, its next chat request is
    refused before routing (this stack has no inference worker: a request let through answers 503)."""
    s = make_stack(chat_tokens_per_minute=100, rate_window_s=NO_ROLLOVER_S)
    alice, bob = s.key("alice"), s.key("bob")
    body = {"model": "tiny-opt-xs", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    with s.client(alice) as c, s.client(bob) as other:
        assert (
            c.post("/v1/chat/completions", json=body).status_code == 503
        )  # under the limit: routed (no worker)
        counter = Counter(s.settings)
        asyncio.run(counter.add(f"tok:{rate_key('Bearer ' + alice)}", 100))  # what the replies streamed
        err = _limited(c.post("/v1/chat/completions", json=body | {"stream": True}))
        assert "100 streamed tokens per minute" in err["message"]
        assert other.post("/v1/chat/completions", json=body).status_code == 503  # bob is not limited


def test_live_jobs_and_queued_gpu_hours_per_tenant(make_stack: Callable[..., Stack]) -> None:
    s = make_stack(max_active_jobs=2)
    with s.client(s.key("alice")) as c, s.client(s.key("bob")) as other:
        first, second = (c.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json() for _ in range(2))
        assert first["status"] == second["status"] == "queued"
        err = _limited(c.post("/v1/fine_tuning/jobs", json=SMALL_SFT))
        assert err["code"] == "quota_active_jobs" and "2 live jobs" in err["message"]
        assert len(c.get("/v1/fine_tuning/jobs").json()["data"]) == 2  # nothing stored for the refused one
        assert other.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()["status"] == "queued"
        c.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel")
        assert c.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()["status"] == "queued"  # room again
    hours = make_stack(max_queued_gpu_hours=1e-6)
    with hours.client(hours.key("carol")) as c:
        err = _limited(c.post("/v1/fine_tuning/jobs", json=SMALL_SFT))
        assert err["code"] == "quota_gpu_hours" and "RLHF_MAX_QUEUED_GPU_HOURS" in err["message"]
        assert (
            c.post("/v1/fine_tuning/jobs/estimate", json=SMALL_SFT).status_code == 200
        )  # estimates are free


def test_grpc_counts_against_the_same_limit(
    make_stack: Callable[..., Stack], new_redis: Callable[[], str]
) -> None:
    """Internal tools on gRPC share a key's budget with its REST traffic."""
    import threading

    import grpc

    from service.grpc.pb import jobs_pb2, jobs_pb2_grpc
    from service.grpc.server import start_server

    s = make_stack(redis_url=new_redis(), rate_limit_per_minute=3, rate_window_s=NO_ROLLOVER_S)
    key = s.key("alice")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(
        start_server(s.settings, host="127.0.0.1", port=0), loop
    ).result(30)
    try:
        with s.client(key) as c, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert c.get("/v1/files").status_code == 200
            jobs, md = jobs_pb2_grpc.JobServiceStub(ch), [("authorization", f"Bearer {key}")]
            for _ in range(2):
                jobs.ListJobs(jobs_pb2.ListJobsRequest(limit=5), metadata=md)
            with pytest.raises(grpc.RpcError) as e:
                jobs.ListJobs(jobs_pb2.ListJobsRequest(limit=5), metadata=md)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailing = dict(e.value.trailing_metadata() or ())
            assert (
                trailing["error-code"] == "rate_limit_exceeded"
                and 1 <= int(trailing["retry-after"]) <= NO_ROLLOVER_S
            )
            _limited(c.get("/v1/files"))
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


def test_a_body_that_trickles_in_is_cut_off_and_holds_no_worker_thread(
    make_stack: Callable[..., Stack],
) -> None:
    """Slow clients (slowloris on the body): 60 connections each send a job request's headers and then
    a byte at a time, more connections than the server has worker threads (40). Each gets 408 in the
    envelope once it stops sending for body_timeout_s or falls behind min_body_bytes_per_s; a normal
    client is served all the while; nothing is stored. An honest slow upload above the rate passes."""
    import select
    import socket
    import threading

    stack = make_stack(body_timeout_s=2.0, min_body_bytes_per_s=200, max_body_bytes=4000)
    key = stack.key("alice")
    host, port = stack.url.removeprefix("http://").split(":")
    body = b'{"model": "tiny-opt-xs", "suffix": "' + b"x" * 400 + b'"}'
    sending = threading.Semaphore(0)  # released by each connection once its headers are sent

    def trickle(pause_s: float, step: int = 1) -> bytes:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer "
                + key.encode()
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
            )
            sending.release()
            sent = 0
            while sent < len(body) and not select.select([sock], [], [], pause_s)[0]:  # until it answers
                sock.sendall(body[sent : sent + step])
                sent += step
            raw = b""
            while b"\r\n\r\n" not in raw or len(raw.partition(b"\r\n\r\n")[2]) < _length(raw):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                raw += chunk
            return raw

    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(trickle(0.5))) for _ in range(60)]
    for t in threads:
        t.start()
    assert all(sending.acquire(timeout=30) for _ in threads)  # all 60 are trickling
    with stack.client(key) as client:  # meanwhile an ordinary client is served
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    for t in threads:
        t.join(60)
    assert len(answers) == 60
    for raw in answers:
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), raw[:200]
        err = json.loads(rest)["error"]
        assert err["code"] == "request_timeout" and "too slow" in err["message"], err
    # a body that keeps above the rate (10 bytes every 20 ms ≈ 500 bytes/s) is taken, however long it takes
    head = trickle(0.02, step=10).partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 400"), head  # (the request itself is refused: its suffix is too long)
    with stack.client(key) as client:
        # a chunked body (no Content-Length) that grows past the limit: 413, not FastAPI's 400
        big = client.post("/v1/fine_tuning/jobs", content=(b" " * 1000 for _ in range(8)))
        assert big.status_code == 413 and big.json()["error"]["code"] == "too_large", big.text
        assert client.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing stored by any of them


def _length(raw: bytes) -> int:
    for line in raw.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0
