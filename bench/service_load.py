"""Job API under load (`make bench`): submission latency at a fixed rate, and status-poll throughput.

A real `rlhf serve` process (uvicorn, one worker process) on loopback, PostgreSQL as the database and
Redis as the broker (no training worker: submitted jobs stay queued). An open-loop load generator
submits jobs at `--rate` per second for `--seconds` (each request is sent on schedule, whether or not
earlier ones have returned, so a slow server cannot hide its queueing; the JSON has the latency per
second of the run), then 8 clients submit back to back (the capacity), then `--pollers` clients poll
job status as fast as they can. The clients are a minimal HTTP/1.1 client (bench/common.py): on the
same 2 cores, httpx's own ~1.5 ms of CPU per request would be measured as the server's. Target
(issue 6): p99 submit latency < 50 ms at 100 submissions/s, no errors. JSON goes to bench/results/.

    python bench/service_load.py [--rate 100 --seconds 10 --pollers 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import RawHTTP, RawPool, pct

from rlhf_engine.runtime.distributed import free_port
from workers.local import create_key, run_loop, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
PG = "postgresql://postgres@127.0.0.1:5432/test"
JOB = {"model": "tiny-opt-xs", "preset": "tiny", "config": {"sft": {"max_steps": 10}}}


SUBMIT = json.dumps(JOB).encode()


async def submit_load(port: int, key: str, rate: float, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    sent: list[float] = []  # when each answered request was sent, seconds from the start
    errors: list[str] = []
    ids: list[str] = []
    pool = RawPool("127.0.0.1", port, key)
    start = time.perf_counter()

    async def one() -> None:
        t = time.perf_counter()
        try:
            status, body = await pool.request("POST", "/v1/fine_tuning/jobs", SUBMIT)
        except OSError as e:
            errors.append(repr(e))
            return
        lat.append(time.perf_counter() - t)
        sent.append(t - start)
        if status != 200:
            errors.append(f"{status}: {body[:200].decode(errors='replace')}")
        else:
            ids.append(json.loads(body)["id"])

    n = int(rate * seconds)
    tasks = []
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    await pool.close()
    by_second: dict[int, list[float]] = {}
    for t, x in zip(sent, lat, strict=True):
        by_second.setdefault(int(t), []).append(x)
    timeline = [
        {"second": s, "p50_ms": round(1000 * pct(v, 0.5), 1), "max_ms": round(1000 * max(v), 1)}
        for s, v in sorted(by_second.items())
    ]
    return {
        "requests": n,
        "errors": len(errors),
        "first_errors": errors[:3],
        "achieved_per_s": n / elapsed,
        "connections": pool.opened,
        "p50_ms": 1000 * pct(lat, 0.5),
        "p90_ms": 1000 * pct(lat, 0.9),
        "p99_ms": 1000 * pct(lat, 0.99),
        "max_ms": 1000 * max(lat),
        "mean_ms": 1000 * statistics.mean(lat),
        "timeline": timeline,
        "ids": ids,
    }


async def closed_loop(port: int, key: str, clients: int, seconds: float) -> dict[str, Any]:
    """`clients` submitting back to back: the most submissions per second this server sustains here."""
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal errors
        conn = RawHTTP("127.0.0.1", port, key)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, _ = await conn.request("POST", "/v1/fine_tuning/jobs", SUBMIT)
            lat.append(time.perf_counter() - t)
            errors += status != 200
        await conn.close()

    await asyncio.gather(*(loop() for _ in range(clients)))
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "per_s": len(lat) / seconds,
        "p50_ms": 1000 * pct(lat, 0.5),
        "p99_ms": 1000 * pct(lat, 0.99),
    }


async def poll_load(port: int, key: str, ids: list[str], pollers: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def loop(k: int) -> None:
        nonlocal errors
        conn = RawHTTP("127.0.0.1", port, key)
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, _ = await conn.request("GET", f"/v1/fine_tuning/jobs/{ids[i % len(ids)]}")
            lat.append(time.perf_counter() - t)
            errors += status != 200
            i += pollers
        await conn.close()

    await asyncio.gather(*(loop(k) for k in range(pollers)))
    return {
        "requests": len(lat),
        "errors": errors,
        "per_s": len(lat) / seconds,
        "p50_ms": 1000 * pct(lat, 0.5),
        "p99_ms": 1000 * pct(lat, 0.99),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--pollers", type=int, default=16)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    ns = ap.parse_args()
    import psycopg

    db = f"rlhf_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    data = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    env = dict(
        os.environ,
        RLHF_DATA_DIR=str(data),
        DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:5432/{db}",
        REDIS_URL=ns.redis,
    )
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve", "--port", str(port), "--loglevel", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(data / "server.log", "wb"),  # noqa: SIM115
    )
    try:
        base = f"http://127.0.0.1:{port}"
        if not wait_healthy(base, server):
            print("server did not start", file=sys.stderr)
            return 1
        key = create_key(env, "bench")
        run_loop(submit_load(port, key, 10, 1))  # warm-up (first plan reads the bundled data)
        submit = run_loop(submit_load(port, key, ns.rate, ns.seconds))
        capacity = run_loop(closed_loop(port, key, 8, ns.seconds))
        ids = submit.pop("ids")
        poll = run_loop(poll_load(port, key, ids, ns.pollers, ns.seconds))
    finally:
        server.terminate()
        server.wait()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
        import redis

        redis.Redis.from_url(ns.redis).flushdb()
    ok = submit["errors"] == 0 and submit["p99_ms"] < 50
    print(
        f"submit: {submit['requests']} jobs at {ns.rate:.0f}/s "
        f"(achieved {submit['achieved_per_s']:.1f}/s): p50 {submit['p50_ms']:.1f} ms, "
        f"p90 {submit['p90_ms']:.1f} ms, p99 {submit['p99_ms']:.1f} ms, max {submit['max_ms']:.1f} ms, "
        f"errors {submit['errors']} — target p99 < 50 ms: {'met' if ok else 'MISSED'}"
    )
    print(
        f"capacity: {capacity['per_s']:.0f} submissions/s with {capacity['clients']} clients back to back, "
        f"p50 {capacity['p50_ms']:.1f} ms, p99 {capacity['p99_ms']:.1f} ms, errors {capacity['errors']}"
    )
    print(
        f"status polls: {poll['per_s']:.0f}/s with {ns.pollers} clients, p50 {poll['p50_ms']:.1f} ms, p99 "
        f"{poll['p99_ms']:.1f} ms, errors {poll['errors']}"
    )
    out = ROOT / "bench" / "results" / f"service-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "rate": ns.rate,
                "seconds": ns.seconds,
                "pollers": ns.pollers,
                "cpu_count": os.cpu_count(),
                "capacity": capacity,
                "submit": submit,
                "poll": poll,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
