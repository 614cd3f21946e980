"""Serving overhead (`make bench`): time to first token and tokens/s through the API vs the chat generator
in process, on the `s` tiny model with several concurrent streams over a few hundred requests.

In process: `--streams` threads each submit requests one after another to one `ChatGenerator`; time to
first token (TTFT) is submit → first token. Through the service: a real `rlhf serve` (uvicorn + the
gRPC relay) and a real `rlhf worker inference` on loopback, SQLite in a temporary data directory, and
`--streams` async clients streaming `POST /v1/chat/completions` (SSE); TTFT is request sent → first
text chunk received. Same prompts, greedy, same max_tokens, so both sides generate the same tokens.
Target (issue 7): the service adds ≤ 10 ms p50 and ≤ 30 ms p99 to TTFT. JSON goes to bench/results/.

    python bench/serving.py [--streams 4 --requests 240 --max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import RawHTTP, pct

from rlhf_engine.runtime.distributed import free_port
from workers.local import create_key, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is a kite?",
    "Where does the owl live?",
    "What color is the sky?",
    "Who bakes the bread?",
    "What does the fox eat?",
    "Why is the river cold?",
    "How tall is the tower?",
    "What is a lamp?",
]


def _summary(ttft: list[float], tokens: int, seconds: float) -> dict[str, Any]:
    return {
        "requests": len(ttft),
        "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
        "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
        "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def in_process(model: Path, streams: int, requests: int, max_tokens: int) -> dict[str, Any]:
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens, temperature=0)
    ttft: list[float] = []
    tokens = 0
    lock = threading.Lock()
    with ChatGenerator.load(str(model), score_replies=False) as engine:
        engine.generate([{"role": "user", "content": "warm up"}], params)

        def client(i: int) -> None:
            nonlocal tokens
            for j in range(i, requests, streams):
                h = engine.submit([{"role": "user", "content": QUESTIONS[j % len(QUESTIONS)]}], params)
                r = h.result()
                with lock:
                    ttft.append(r.time_to_first_token)
                    tokens += r.usage.completion_tokens

        t = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return _summary(ttft, tokens, time.monotonic() - t)


def _body(model: str, question: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class _Reply:
    """Reads one streamed reply's SSE lines: when the first text arrived, and the completion tokens."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.tokens = 0

    def lines(self, text: bytes) -> None:
        for line in text.split(b"\n"):
            if not line.startswith(b"data:") or line.rstrip().endswith(b"[DONE]"):
                continue
            data = json.loads(line[5:])
            if self.first is None and any(ch["delta"].get("content") for ch in data["choices"]):
                self.first = time.perf_counter()
            if data.get("usage"):
                self.tokens += data["usage"]["completion_tokens"]


class RawClient:
    """A minimal HTTP/1.1 client on one keep-alive connection (bench/common.RawHTTP): the measurement
    should be the service's time, not a client library's (httpx adds about 1-2 ms per request here)."""

    def __init__(self, port: int, key: str) -> None:
        self.http = RawHTTP("127.0.0.1", port, key)

    async def chat(self, body: dict[str, Any]) -> tuple[float | None, int]:
        """(seconds to the first text chunk, completion tokens) of one streamed request."""
        reply = _Reply()
        sent = time.perf_counter()
        status, text = await self.http.request(
            "POST", "/v1/chat/completions", json.dumps(body).encode(), on_chunk=reply.lines
        )
        if status != 200:
            raise RuntimeError(f"{status}: {text[:200].decode(errors='replace')}")
        return (None if reply.first is None else reply.first - sent), reply.tokens


class HttpxClient:
    """The same through httpx (`--client httpx`): the library's own cost included."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def chat(self, body: dict[str, Any]) -> tuple[float | None, int]:
        reply = _Reply()
        sent = time.perf_counter()
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                reply.lines(line.encode())
        return (None if reply.first is None else reply.first - sent), reply.tokens


async def through_api(
    port: int, key: str, model: str, streams: int, requests: int, max_tokens: int, client: str
) -> dict[str, Any]:
    import httpx

    ttft: list[float] = []
    tokens = 0
    errors: list[str] = []
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as hx:
        clients = [RawClient(port, key) if client == "raw" else HttpxClient(hx) for _ in range(streams)]
        await clients[0].chat(
            _body(model, "warm up", max_tokens)
        )  # the first request on a path pays for its setup

        async def run(i: int) -> None:
            nonlocal tokens
            for j in range(i, requests, streams):
                try:
                    first, n = await clients[i].chat(_body(model, QUESTIONS[j % len(QUESTIONS)], max_tokens))
                except Exception as e:  # counted and reported
                    errors.append(str(e))
                    continue
                tokens += n
                if first is None:
                    errors.append("no text")
                else:
                    ttft.append(first)

        t = time.monotonic()
        await asyncio.gather(*(run(i) for i in range(streams)))
        out = _summary(ttft, tokens, time.monotonic() - t)
    out["errors"] = len(errors)
    if errors:
        out["first_error"] = errors[0]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="raw: a minimal HTTP/1.1 client (measures the service); httpx: the library's own cost too",
    )
    ap.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="torch threads of the engine, in process and in the worker (RLHF_INFERENCE_THREADS; 0: "
        "torch's default, one per core — which on 2 cores leaves none for the API)",
    )
    ns = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if ns.engine_threads:  # the same engine threads in process as in the worker (set before torch loads)
        os.environ["OMP_NUM_THREADS"] = str(ns.engine_threads)
    from rlhf_engine.models.tiny import build_tiny

    model = build_tiny("opt", "s", pretrain_steps=200)
    local = in_process(model, ns.streams, ns.requests, ns.max_tokens)

    data = Path(tempfile.mkdtemp(prefix="rlhf-bench-serving-"))
    shutil.copytree(model, data / "models" / "bench-s")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")} | {
        "RLHF_DATA_DIR": str(data)
    }
    env["RLHF_INFERENCE_THREADS"] = str(ns.engine_threads)
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "serve",
                "--port",
                str(port),
                "--grpc-port",
                str(free_port()),
                "--loglevel",
                "WARNING",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker", "inference"],
            env=env,
            stderr=open(data / "worker.log", "wb"),  # noqa: SIM115
        ),
    ]
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        if not wait_healthy(base, procs[0]):
            raise SystemExit("the API server did not start")
        key = create_key(env, "bench")
        deadline = time.monotonic() + 120  # until the worker has registered and loaded the model
        warm = {"model": "bench-s", "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1}
        while (
            httpx.post(
                f"{base}/v1/chat/completions",
                json=warm,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            ).status_code
            != 200
        ):
            if time.monotonic() > deadline:
                raise SystemExit("no inference worker answered")
            time.sleep(0.5)
        api = asyncio.run(
            through_api(port, key, "bench-s", ns.streams, ns.requests, ns.max_tokens, ns.client)
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        # the engine's own time to first token inside the worker (submit → first token), per request
        inside = [
            float(line.rsplit("first token ", 1)[1].split()[0])
            for line in (data / "worker.log").read_text().splitlines()
            if "first token " in line
        ][1:]
        shutil.rmtree(data, ignore_errors=True)
    if inside:
        api["engine_ttft_in_worker_p50_ms"] = pct(inside, 0.5)
        api["engine_ttft_in_worker_p99_ms"] = pct(inside, 0.99)

    added = {
        "ttft_p50_ms": api["ttft_p50_ms"] - local["ttft_p50_ms"],
        "ttft_p99_ms": api["ttft_p99_ms"] - local["ttft_p99_ms"],
    }
    print(
        f"tiny-opt-s, {ns.streams} concurrent streams, {ns.requests} requests of {ns.max_tokens} tokens "
        f"(greedy), {os.cpu_count()} CPUs"
    )
    print(f"{'':14} {'TTFT p50':>10} {'TTFT p99':>10} {'tokens/s':>10} {'errors':>7}")
    for name, r in (("in process", local), ("through API", api)):
        print(
            f"{name:14} {r['ttft_p50_ms']:8.1f}ms {r['ttft_p99_ms']:8.1f}ms "
            f"{r['tokens_per_s']:10.0f} {r.get('errors', 0):7}"
        )
    if inside:
        print(
            f"{'(in worker)':14} {api['engine_ttft_in_worker_p50_ms']:8.1f}ms "
            f"{api['engine_ttft_in_worker_p99_ms']:8.1f}ms"
            "   the engine's own submit → first token inside the worker"
        )
    print(
        f"{'added':14} {added['ttft_p50_ms']:8.1f}ms {added['ttft_p99_ms']:8.1f}ms   "
        "(target ≤ 10 ms p50, ≤ 30 ms p99)"
    )
    out = ROOT / "bench" / "results" / f"serving-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"config": vars(ns), "in_process": local, "through_api": api, "added": added}, indent=2)
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
