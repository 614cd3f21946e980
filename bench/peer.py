"""Serving against the peer a user tries first: our service (`rlhf serve` + `rlhf worker inference`,
the chat generator with continuous batching) and Hugging Face's `transformers serve --continuous-batching`,
on the same real model (SmolLM2-135M-Instruct), the same prompts and the same client.

For 1, 8 and 32 concurrent streams (each stream sends its requests one after another): generated
tokens/s (completion tokens over the wall time of the level, tokens counted by re-tokenising the
streamed text with the model's tokenizer, the same on both sides) and time to first token (request
sent → first text chunk). Greedy decoding and the same `max_tokens` on both sides. Each server runs
alone on the machine (started for its turn, stopped after); each level runs `--repeats` times per side
in alternating order (ours, peer, peer, ours …) so that a machine whose speed drifts — ±20% within
minutes here — slows both alike, and the medians are compared.

The machine's limit, measured in the same run: decoding S streams reads every weight once per token
step, so `linear(x[S rows], W)` over as many bytes of weights as the model has gives the passes per
second the memory system allows, i.e. at most that many × S tokens/s (an upper bound: it ignores
attention and everything but the weights). Reported before and after.

    python bench/peer.py [--streams 1 8 32 --rounds 2 --max-tokens 64 --repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import pct

from rlhf_engine.runtime.distributed import free_port
from workers.local import create_key, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is a kite?",
    "Where does the owl live?",
    "Why is the sky blue?",
    "Who invented bread?",
    "What does a fox eat?",
    "Why are rivers cold?",
    "How tall can a tower be?",
    "What is a lamp?",
    "Name three colours.",
    "How do bees make honey?",
    "What is a whale?",
    "Describe a forest.",
]
MODEL = "smollm2-135m-instruct"  # the bundled name (our server builds it into its model root from the cache)


def weight_probe(
    weight_bytes: int, rows: tuple[int, ...] = (1, 8, 32), dtype: str = "fp32"
) -> dict[str, float]:
    """Passes per second of `linear(x[rows], W)` with W holding as many weights as the model's fp32 bytes
    say, stored in `dtype` (fp32, bf16, or int8: torchao's weight-only int8 layer)."""
    import torch

    k = 4096
    layer = torch.nn.Linear(k, weight_bytes // (4 * k), bias=False)
    compute = torch.float32
    if dtype == "bf16":
        layer, compute = layer.to(torch.bfloat16), torch.bfloat16
    elif dtype == "int8":
        from rlhf_engine.chat.loading import int8_weights

        int8_weights(layer)
    out = {}
    with torch.no_grad():
        for r in rows:
            x = torch.randn(r, k, dtype=compute)
            layer(x)
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < 2.0:
                layer(x)
                n += 1
            out[f"passes_per_s_{r}_rows"] = n / (time.perf_counter() - t)
    return out


async def _one(client: Any, url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[float, str]:
    sent = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.rstrip().endswith("[DONE]"):
                continue
            data = json.loads(line[5:])
            for ch in data.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                text.append(piece)
    if first is None:
        raise RuntimeError("no text streamed")
    return first - sent, "".join(text)


async def level(
    base: str,
    model: str,
    headers: dict[str, str],
    streams: int,
    requests: int,
    max_tokens: int,
    tokenizer: Any,
) -> dict[str, Any]:
    import httpx

    ttft: list[float] = []
    texts: list[str] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:

        async def run(i: int) -> None:
            for j in range(i, requests, streams):
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": QUESTIONS[j % len(QUESTIONS)]}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                }
                try:
                    first, text = await _one(client, "/v1/chat/completions", body, headers)
                except Exception as e:  # counted and reported
                    errors.append(str(e))
                    continue
                ttft.append(first)
                texts.append(text)

        t = time.monotonic()
        await asyncio.gather(*(run(i) for i in range(streams)))
        seconds = time.monotonic() - t
    tokens = sum(len(tokenizer(x, add_special_tokens=False)["input_ids"]) for x in texts)
    out: dict[str, Any] = {
        "streams": streams,
        "requests": len(texts),
        "errors": len(errors),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
    }
    if ttft:
        out |= {
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5),
            "ttft_p90_ms": 1e3 * pct(ttft, 0.9),
            "ttft_mean_ms": 1e3 * statistics.fmean(ttft),
        }
    if errors:
        out["first_error"] = errors[0]
    return out


def _wait(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    ok: Any,
) -> None:
    """Post `body` to `url` every second until `ok(response)`; exits if `proc` ends or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
        try:
            if ok(httpx.post(url, json=body, headers=headers, timeout=120)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{proc.args!r} did not answer within {timeout_s:.0f} s")


class Ours:
    name = "ours"

    def __init__(self, env: dict[str, str]) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="rlhf-bench-peer-"))
        self.env = env | {"RLHF_DATA_DIR": str(self.data)}
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> tuple[str, str, dict[str, str]]:
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "workers.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--grpc-port",
                    str(free_port()),
                    "--loglevel",
                    "WARNING",
                ],
                env=self.env,
                stderr=subprocess.DEVNULL,
            ),
            subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker", "inference"],
                env=self.env,
                stderr=open(self.data / "worker.log", "wb"),  # noqa: SIM115
            ),
        ]
        base = f"http://127.0.0.1:{self.port}"
        if not wait_healthy(base, self.procs[0]):
            raise SystemExit("our API server did not start")
        headers = {"Authorization": f"Bearer {create_key(self.env, 'bench')}"}
        warm = {"model": MODEL, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2}
        _wait(
            f"{base}/v1/chat/completions", warm, headers, self.procs[0], 600, lambda r: r.status_code == 200
        )
        return base, MODEL, headers

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=60)
        shutil.rmtree(self.data, ignore_errors=True)


class Peer:
    name = "transformers serve"

    def __init__(self, env: dict[str, str], model_dir: Path, dtype: str = "auto") -> None:
        self.env, self.model_dir, self.port, self.dtype = env, model_dir, free_port(), dtype
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> tuple[str, str, dict[str, str]]:
        exe = Path(sys.executable).with_name("transformers")
        self.proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                "--continuous-batching",
                "--device",
                "cpu",
                "--dtype",
                self.dtype,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                str(self.model_dir),
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{self.port}"
        warm = {
            "model": str(self.model_dir),
            "messages": [{"role": "user", "content": "warm up"}],
            "max_tokens": 2,
            "stream": True,
        }
        _wait(f"{base}/v1/chat/completions", warm, {}, self.proc, 600, lambda r: r.status_code == 200)
        return base, str(self.model_dir), {}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2, help="requests per stream at each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs per side at each level (alternating order)")
    ap.add_argument(
        "--ours-dtype",
        default="fp32",
        choices=["fp32", "bf16", "int8"],
        help="our inference workers' weights (RLHF_INFERENCE_DTYPE)",
    )
    ap.add_argument(
        "--peer-dtypes",
        nargs="+",
        default=["auto"],
        help="transformers serve --dtype, one side each (auto: the weights' fp32; bfloat16)",
    )
    ns = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {"HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": env.get("DS_ACCELERATOR", "cpu")}
    os.environ.update(HF_HUB_OFFLINE="1")
    import torch
    from transformers import AutoTokenizer

    from rlhf_engine.models.gguf import build_smollm2

    model_dir = build_smollm2()
    tok = AutoTokenizer.from_pretrained(model_dir)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    probe_before = weight_probe(weight_bytes)
    precisions = sorted({ns.ours_dtype, *("bf16" for d in ns.peer_dtypes if d == "bfloat16")} - {"fp32"})
    bounds_before = {d: weight_probe(weight_bytes, dtype=d) for d in precisions}
    peers = {"transformers serve" if d == "auto" else f"transformers serve {d}": d for d in ns.peer_dtypes}
    sides = ["ours", *peers]
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {} for name in sides}
    ours_env = env | {"RLHF_INFERENCE_DTYPE": ns.ours_dtype}
    for i, streams in enumerate(ns.streams):
        order = sides if i % 2 == 0 else sides[::-1]
        for r in range(ns.repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                server = Ours(ours_env) if name == "ours" else Peer(env, model_dir, peers[name])
                try:  # stopped also when it fails to start: nothing outlives the bench
                    base, model, headers = server.start()
                    got = asyncio.run(
                        level(base, model, headers, streams, streams * ns.rounds, ns.max_tokens, tok)
                    )
                finally:
                    server.stop()
                runs[name].setdefault(streams, []).append(got)
                print(
                    f"{name:20} {streams:3} streams: {got['tokens_per_s']:7.1f} tokens/s, TTFT p50 "
                    f"{got.get('ttft_p50_ms', float('nan')):7.0f} ms, {got['errors']} errors",
                    flush=True,
                )
    results = {
        name: {
            streams: {
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "ttft_p50_ms": statistics.median(r.get("ttft_p50_ms", float("nan")) for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "runs": rs,
            }
            for streams, rs in by.items()
        }
        for name, by in runs.items()
    }
    probe_after = weight_probe(weight_bytes)
    bounds_after = {d: weight_probe(weight_bytes, dtype=d) for d in precisions}
    print(
        f"\nSmolLM2-135M-Instruct ({weight_bytes / 2**20:.0f} MB of weights), "
        f"{ns.max_tokens} tokens per reply, greedy, {os.cpu_count()} CPUs"
    )
    print(f"ours: {ns.ours_dtype} weights")
    for peer in peers:
        print(
            f"{'streams':>7} {'ours tok/s':>10} {'peer tok/s':>10} {'×peer':>6} "
            f"{'ours TTFT':>10} {'peer TTFT':>10} {'fp32 limit tok/s':>16}   ({peer})"
        )
        for streams in ns.streams:
            o, p = results["ours"][streams], results[peer][streams]
            rows = min((r for r in (1, 8, 32) if r >= streams), default=32)
            limit = (
                min(probe_before[f"passes_per_s_{rows}_rows"], probe_after[f"passes_per_s_{rows}_rows"])
                * streams
            )
            print(
                f"{streams:7} {o['tokens_per_s']:10.1f} {p['tokens_per_s']:10.1f} "
                f"{o['tokens_per_s'] / p['tokens_per_s']:6.2f} "
                f"{o.get('ttft_p50_ms', float('nan')):8.0f}ms {p.get('ttft_p50_ms', float('nan')):8.0f}ms "
                f"{limit:16.0f}"
            )
    out = ROOT / "bench" / "results" / f"peer-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "probe_before": probe_before,
                    "probe_after": probe_after,
                    "bounds_before": bounds_before,  # other precisions' passes per second
                    "bounds_after": bounds_after,
                    "weight_bytes": weight_bytes,
                },
                "settings": vars(ns),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
