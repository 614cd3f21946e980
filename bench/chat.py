"""Chat generator throughput: backends side by side, and what continuous batching buys (`make bench`).

On one tiny model (OPT `s` ≈ 3.4M parameters by default; `--size m` for ≈ 25M), each backend runs
in its own process (twice, alternating, medians reported) with the same prompts and seeds, replies
forced to `--tokens` tokens:

  single       one request at a time, greedy: decode tokens/s and time-to-first-token (TTFT)
  concurrent   `--streams` requests submitted together: aggregate tokens/s, TTFT p50/p95, and the
               time a short request submitted while long ones run waits for its first token
  generate     Hugging Face `generate` on the same model, one request at a time (the plain baseline)

Prints a table and writes JSON to bench/results/. The faster backend on this machine is the
engine's default (`backend=auto`), stated in docs/measurements/chat.md.

    python bench/chat.py [--size s --tokens 128 --streams 8 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import pct

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Tell me about the dog.",
    "What is a kite?",
    "Where does the owl live?",
    "Describe the sea.",
    "What color is the apple?",
    "Why do cats sleep?",
    "How big is the moon?",
    "Who has a lamp?",
]


def _single(engine: Any, msgs: list[dict[str, str]], tokens: int) -> tuple[float, float]:
    from rlhf_engine.chat import SamplingParams

    t = time.monotonic()
    res = engine.generate(msgs, SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True))
    return res.usage.completion_tokens / (time.monotonic() - t), res.time_to_first_token


def _concurrent(engine: Any, msgs: list[list[dict[str, str]]], tokens: int, streams: int) -> dict[str, Any]:
    from rlhf_engine.chat import SamplingParams

    t = time.monotonic()
    handles = [
        engine.submit(msgs[i % len(msgs)], SamplingParams(max_new_tokens=tokens, seed=i, ignore_eos=True))
        for i in range(streams)
    ]
    time.sleep(0.2)  # the long replies are decoding when the short request arrives
    short = engine.submit(msgs[0], SamplingParams(max_new_tokens=4, seed=99, ignore_eos=True))
    results = [h.result() for h in handles]
    late = short.result().time_to_first_token
    rate = sum(r.usage.completion_tokens for r in results) / (time.monotonic() - t)
    return {"rate": rate, "ttft": [r.time_to_first_token for r in results], "late": late}


def run_one(which: str, model: str, tokens: int, streams: int, repeats: int) -> dict[str, Any]:
    """One backend (or plain `generate`) in this process. Only one thread here runs torch: each
    thread that does gets its own OpenMP team, and two teams spinning on 2 cores distort timings."""
    import torch

    from rlhf_engine.chat import ChatGenerator, SamplingParams

    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    started = time.monotonic()
    engine = ChatGenerator.load(model, backend="transformers" if which == "generate" else which)
    load_s = time.monotonic() - started
    if which == "generate":
        return _plain_generate(engine, model, msgs, tokens, repeats)
    engine.generate(msgs[0], SamplingParams(temperature=0, max_new_tokens=8))  # warm-up
    single, ttft, conc = [], [], []
    for r in range(repeats):
        rate, first = _single(engine, msgs[r % len(msgs)], tokens)
        single.append(rate)
        ttft.append(first)
        conc.append(_concurrent(engine, msgs, tokens, streams))
    engine.close()
    all_ttft = [x for c in conc for x in c["ttft"]]
    return {
        "backend": which,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "single_tokens_per_s": statistics.median(single),
        "single_ttft_ms": 1000 * statistics.median(ttft),
        "concurrent_tokens_per_s": statistics.median(c["rate"] for c in conc),
        "concurrent_ttft_p50_ms": 1000 * pct(all_ttft, 0.5),
        "concurrent_ttft_p95_ms": 1000 * pct(all_ttft, 0.95),
        "late_request_ttft_ms": 1000 * statistics.median(c["late"] for c in conc),
    }


def _plain_generate(
    engine: Any, model: str, msgs: list[list[dict[str, str]]], tokens: int, repeats: int
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    prompts = [engine.prompt_ids(m) for m in msgs]
    pad = engine.tokenizer.pad_token_id
    engine.close()  # its thread never ran torch
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    rates = []
    for r in range(repeats + 1):
        ids = torch.tensor([prompts[r % len(prompts)]])
        t = time.monotonic()
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                pad_token_id=pad,
            )
        if r:  # the first call warms up
            rates.append((out.shape[1] - ids.shape[1]) / (time.monotonic() - t))
    return {"backend": "hf generate", "single_tokens_per_s": statistics.median(rates)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="s", choices=["xs", "s", "m"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--rounds", type=int, default=2, help="runs of every backend, alternating (medians reported)"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rlhf_engine.models.tiny import build_tiny

    model = str(build_tiny("opt", ns.size, pretrain_steps=200))
    if ns.one:
        print("RESULT " + json.dumps(run_one(ns.one, model, ns.tokens, ns.streams, ns.repeats)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {b: [] for b in ("transformers", "deepspeed", "generate")}
    for _ in range(ns.rounds):  # A B C A B C: the machine's drift hits every backend alike
        for one in runs:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    one,
                    "--size",
                    ns.size,
                    "--tokens",
                    str(ns.tokens),
                    "--streams",
                    str(ns.streams),
                    "--repeats",
                    str(ns.repeats),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs[one].append(json.loads(lines[-1][7:]))
    rows = [
        {k: (statistics.median(r[k] for r in rs) if isinstance(v, float) else v) for k, v in rs[0].items()}
        for rs in runs.values()
    ]
    print(
        f"\nOPT {ns.size}, {ns.tokens} tokens per reply, {ns.streams} concurrent streams, "
        f"median of {ns.repeats} × {ns.rounds} rounds"
    )
    print(
        f"{'backend':<14}{'1 stream tok/s':>16}{'TTFT ms':>10}{'N streams tok/s':>17}{'TTFT p50/p95 ms':>18}"
        f"{'late TTFT ms':>14}"
    )
    for r in rows:
        if "concurrent_tokens_per_s" in r:
            print(
                f"{r['backend']:<14}{r['single_tokens_per_s']:>16.0f}{r['single_ttft_ms']:>10.1f}"
                f"{r['concurrent_tokens_per_s']:>17.0f}"
                f"{r['concurrent_ttft_p50_ms']:>9.1f}/{r['concurrent_ttft_p95_ms']:<8.1f}"
                f"{r['late_request_ttft_ms']:>14.1f}"
            )
        else:
            print(f"{r['backend']:<14}{r['single_tokens_per_s']:>16.0f}")
    out = ROOT / "bench" / "results" / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "size": ns.size,
                "tokens": ns.tokens,
                "streams": ns.streams,
                "repeats": ns.repeats,
                "rounds": ns.rounds,
                "cpu_count": os.cpu_count(),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
