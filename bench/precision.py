"""Lower-precision decoding (issue 33, item 3): quality and speed of bf16 and int8 weights vs fp32.

SmolLM2-135M-Instruct in the chat engine at each `--dtypes` precision:

- quality: greedy replies (`--max-tokens`) to 200 prompts compared with fp32's, token for token (the
  share that are identical), and perplexity on a held-out text (this repository's README and docs: text
  the model never saw) in windows of `--window` tokens, relative to fp32's;
- speed: generated tokens/s at `--streams` concurrent streams (greedy, EOS ignored: same token count on
  every side), each precision alone on the machine, alternating, `--repeats` times, medians;
- the machine's bound per precision, measured in the same run: passes per second of one linear layer
  over as many weights as the model has (fp32, bf16, torchao int8 weight-only) at each streams level.

Targets (issue 33): greedy equal to fp32's on ≥ 95% of the prompts and perplexity within 1%.
JSON goes to bench/results/.

    python bench/precision.py [--dtypes fp32 bf16 int8 --streams 8 32 --max-tokens 32 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from adapters import drive
from peer import weight_probe

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = [
    "the moon",
    "a rainbow",
    "bread",
    "volcanoes",
    "the ocean",
    "a library",
    "honey bees",
    "winter",
    "bicycles",
    "the internet",
]
TEMPLATES = [
    "What is {}?",
    "Explain {} in one sentence.",
    "Write a haiku about {}.",
    "Give me three facts about {}.",
    "Why do people like {}?",
    "Describe {} to a child.",
    "What is the history of {}?",
    "Write a short story about {}.",
    "List two pros and two cons of {}.",
    "How would you draw {}?",
    "Tell me a joke about {}.",
    "What colour is {}?",
    "Compare {} with a mountain.",
    "Summarise what you know about {}.",
    "What questions would a scientist ask about {}?",
    "Write a tweet about {}.",
    "How does {} change over a year?",
    "Is {} important? Why?",
    "Give a one-word answer: what is {} made of?",
    "Write the opening line of a poem about {}.",
]


def prompts() -> list[str]:
    return [t.format(s) for t in TEMPLATES for s in SUBJECTS]  # 200


def held_out_text() -> str:
    parts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(p.read_text() for p in parts)


def perplexity(module: Any, ids: list[int], window: int) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]])
            if chunk.shape[1] < 2:
                break
            logits = module(input_ids=chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            nll += float(loss)
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def replies(engine: Any, questions: list[str], max_tokens: int) -> list[list[int]]:
    from rlhf_engine.chat import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=max_tokens)
    handles = [engine.submit([{"role": "user", "content": q}], params) for q in questions]
    return [h.result().choices[0].token_ids for h in handles]


def speed(engine: Any, streams: int, per_stream: int, max_tokens: int) -> float:
    """Generated tokens/s of `streams` streams over these prompts (bench/adapters.py's driver)."""
    out = drive(engine, streams, per_stream, max_tokens, [None], questions=prompts())
    if out["errors"]:
        raise SystemExit(f"{streams} streams: {out['errors'][0]}")
    return float(out["tokens_per_s"])


def bound(params: int, rows: list[int], dtypes: list[str]) -> dict[str, dict[str, float]]:
    """Passes/s of `linear(x[rows], W)` with W of `params` weights, per precision (bench/peer.py's probe)."""
    return {d: weight_probe(params * 4, tuple(rows), dtype=d) for d in dtypes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"])
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--speed-tokens", type=int, default=64)
    ap.add_argument("--per-stream", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--quality-only", action="store_true", help="skip the speed runs")
    args = ap.parse_args()

    import torch

    from rlhf_engine.chat import ChatGenerator
    from rlhf_engine.models.gguf import build_smollm2

    base = build_smollm2()
    questions = prompts()
    text = held_out_text()  # read once: every precision is scored on the same text
    params = sum(f.stat().st_size for f in base.glob("*.safetensors")) // 4
    probe_before = bound(params, args.streams, args.dtypes)
    quality: dict[str, Any] = {}
    ref: list[list[int]] = []
    for dtype in args.dtypes:
        with ChatGenerator.load(str(base), backend="transformers", dtype=dtype, max_batch_size=64) as engine:
            text_ids = engine.tokenizer(text)["input_ids"]
            started = time.perf_counter()
            got = replies(engine, questions, args.max_tokens)
            ppl = perplexity(engine.loaded.module, text_ids, args.window)
            quality[dtype] = {
                "perplexity": ppl,
                "held_out_tokens": len(text_ids),
                "s": time.perf_counter() - started,
            }
            if dtype == args.dtypes[0]:
                ref = got
            same = sum(a == b for a, b in zip(got, ref, strict=True))
            quality[dtype] |= {
                "greedy_equal": same,
                "prompts": len(questions),
                "greedy_equal_share": same / len(ref),
            }
            print(f"{dtype}: greedy equal {same}/{len(ref)}, perplexity {ppl:.3f}")
    base_ppl = quality[args.dtypes[0]]["perplexity"]
    for q in quality.values():
        q["perplexity_vs_first"] = q["perplexity"] / base_ppl
    runs: dict[str, dict[str, list[float]]] = {str(s): {d: [] for d in args.dtypes} for s in args.streams}
    for r in range(0 if args.quality_only else args.repeats):
        order = args.dtypes if r % 2 == 0 else list(reversed(args.dtypes))
        for dtype in order:
            with ChatGenerator.load(
                str(base), backend="transformers", dtype=dtype, max_batch_size=64
            ) as engine:
                speed(engine, 4, 1, 8)  # warm
                for s in args.streams:
                    tps = speed(engine, s, args.per_stream, args.speed_tokens)
                    runs[str(s)][dtype].append(tps)
                    print(f"{s:>3} streams {dtype}: {tps:.1f} tok/s")
    probe_after = bound(params, args.streams, args.dtypes)
    medians = {s: {d: statistics.median(v) for d, v in per.items() if v} for s, per in runs.items()}
    result = {
        "bench": "precision",
        "model": "SmolLM2-135M-Instruct",
        "quality": quality,
        "speed_runs": runs,
        "median_tokens_per_s": medians,
        "bound_before": probe_before,
        "bound_after": probe_after,
        "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
    }
    print(json.dumps({"quality": quality, "median_tokens_per_s": medians}, indent=1))
    out = ROOT / "bench" / "results" / f"precision-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
