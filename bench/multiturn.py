"""A conversation's second turn: time to first token with the prompt cache on and off.

On SmolLM2-135M-Instruct (built offline, `rlhf models smollm2`), the chat generator alone: each
conversation's first question gets a greedy reply of up to `--tokens` tokens, then the second turn
(the first turn, its reply, "Say more.") asks for one token; its time to first token is the prefill of
what the cache does not hold. With the cache on, the first turn's prompt and reply come from it; off,
the whole conversation is prefilled. Each setting runs `--repeats` times, alternating; medians.

    python bench/multiturn.py [--tokens 160 --repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from common import write_result

QUESTIONS = [
    "Tell me about the history of Rome.",
    "Explain how a bicycle works.",
    "Describe the water cycle.",
    "Why is the sky blue?",
]


def run(model: Path, cache_mb: float, tokens: int) -> dict[str, Any]:
    from rlhf_engine.chat import ChatGenerator, SamplingParams

    ttft, reused, prompt = [], [], []
    with ChatGenerator.load(str(model), prefix_cache_mb=cache_mb) as engine:
        for q in QUESTIONS:
            first = [{"role": "user", "content": q}]
            reply = engine.generate(first, SamplingParams(temperature=0, max_new_tokens=tokens)).choices[0]
            turn2 = [
                *first,
                {"role": "assistant", "content": reply.text},
                {"role": "user", "content": "Say more."},
            ]
            before = engine.prompt_cache["reused_tokens"]
            second = engine.generate(turn2, SamplingParams(temperature=0, max_new_tokens=1))
            ttft.append(second.time_to_first_token)
            reused.append(engine.prompt_cache["reused_tokens"] - before)
            prompt.append(len(engine.prompt_ids(turn2)))
    return {"ttft_s": ttft, "reused_tokens": reused, "prompt_tokens": prompt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=160, help="the first reply's length at most")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from step3 import machine_probe

    from rlhf_engine.models.gguf import build_smollm2

    model = build_smollm2()
    probe_before = machine_probe()
    settings = {"on": 256.0, "off": 0.0}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    for r in range(args.repeats):
        for name in settings if r % 2 == 0 else reversed(settings):
            runs[name].append(run(model, settings[name], args.tokens))
    probe_after = machine_probe()
    summary = {}
    for name, rs in runs.items():
        ttft = [t for r in rs for t in r["ttft_s"]]
        summary[name] = {
            "ttft_p50_ms": 1000 * statistics.median(ttft),
            "reused_tokens": rs[0]["reused_tokens"],
            "prompt_tokens": rs[0]["prompt_tokens"],
        }
        print(
            f"cache {name:3}: second turn TTFT p50 {summary[name]['ttft_p50_ms']:.0f} ms; reused "
            f"{summary[name]['reused_tokens']} of {summary[name]['prompt_tokens']} prompt tokens"
        )
    print(f"machine before → after: {probe_before} → {probe_after}")
    out = write_result(
        "multiturn",
        {
            "settings": vars(args),
            "machine": {"probe_before": probe_before, "probe_after": probe_after},
            "summary": summary,
            "runs": runs,
        },
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
