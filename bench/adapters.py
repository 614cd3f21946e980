"""Many LoRA adapters on one base vs one merged model (issue 33, item 4a), in the chat engine itself.

SmolLM2-135M-Instruct; `--adapters` PEFT LoRA adapters (rank `--rank` on the attention projections, random
weights small enough to keep the replies fluent). Two sides, each alone on the machine, alternating
(merged, adapters, adapters, merged …) `--repeats` times per streams level, medians compared:

- merged: one adapter merged into the weights (`merge_and_unload`), served as a whole model — what a
  service without multi-adapter batching runs for each fine-tune;
- adapters: the base once with every adapter resident; stream i's requests name adapter i mod N, so a
  decode step's batch mixes all of them (at 8 streams: 8 different adapters; at 32: all 16, twice).

Each stream sends requests one after another (greedy, `--max-tokens` tokens each, EOS ignored so both
sides generate the same number of tokens). Reported: generated tokens/s per level and side, their ratio,
and resident memory: the base's weights + the adapters' vs one merged copy per adapter (what serving
each fine-tune as a whole model holds). The machine's bound (`linear` over as many bytes as the weights,
as bench/peer.py measures it) is probed before and after. JSON goes to bench/results/.

    python bench/adapters.py [--streams 8 32 --adapters 16 --rank 8 --max-tokens 64 --repeats 2]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from peer import QUESTIONS, weight_probe

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(base: Path, out: Path, n: int, rank: int) -> Any:
    """`n` adapters for `base` in out/a0 … (PEFT format); returns adapter 0 merged into the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    merged = None
    for i in range(n):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        peft_model = get_peft_model(
            model,
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False),
        )
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)  # a fine-tune's size of change: the replies stay fluent
        peft_model.save_pretrained(str(out / f"a{i}"), safe_serialization=True)
        if i == 0:
            merged = peft_model.merge_and_unload()
    return merged


def drive(
    engine: Any,
    streams: int,
    per_stream: int,
    max_tokens: int,
    adapters: list[str | None],
    questions: list[str] = QUESTIONS,
) -> dict[str, Any]:
    """`streams` threads, each sending `per_stream` requests one after another (stream i with adapter
    i mod len(adapters)); generated tokens over the wall time."""
    from rlhf_engine.chat import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=max_tokens, ignore_eos=True)
    tokens = [0] * streams
    errors: list[str] = []

    def stream(i: int) -> None:
        try:
            for j in range(per_stream):
                q = [{"role": "user", "content": questions[(i + j) % len(questions)]}]
                result = engine.generate(q, params, adapter=adapters[i % len(adapters)])
                tokens[i] += result.usage.completion_tokens
        except Exception as e:  # reported, never hidden
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall, "errors": errors}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-stream", type=int, default=2, help="requests each stream sends per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "int8"])
    ap.add_argument(
        "--prefix-cache-mb",
        type=float,
        default=256.0,
        help="the engine's prompt cache (the worker's default 256; 0: off — a prompt's keys/values are "
        "per adapter, so the merged side reuses more of them)",
    )
    args = ap.parse_args()

    import torch

    from rlhf_engine.chat import ChatGenerator
    from rlhf_engine.models.gguf import build_smollm2

    base = build_smollm2()
    tmp = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    atexit.register(shutil.rmtree, tmp, True)  # 17 copies' worth of weights: never left behind
    merged_model = make_adapters(base, tmp, args.adapters, args.rank)
    merged_dir = tmp / "merged"
    merged_model.save_pretrained(str(merged_dir), safe_serialization=True)
    for f in base.iterdir():  # the tokenizer and template of the base
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            (merged_dir / f.name).write_bytes(f.read_bytes())
    del merged_model
    weight_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    probe_before = weight_probe(weight_bytes, rows=tuple(sorted(set(args.streams))))

    keys = [f"a{i}" for i in range(args.adapters)]
    results: dict[str, Any] = {"levels": {}}
    memory: dict[str, Any] = {}
    for streams in args.streams:
        runs: dict[str, list[dict[str, Any]]] = {"merged": [], "adapters": []}
        for r in range(args.repeats):
            order = ["merged", "adapters"] if r % 2 == 0 else ["adapters", "merged"]
            for side in order:
                path = merged_dir if side == "merged" else base
                with ChatGenerator.load(
                    str(path),
                    backend="transformers",
                    dtype=args.dtype,
                    max_batch_size=max(32, streams),
                    prefix_cache_mb=args.prefix_cache_mb,
                ) as engine:
                    if side == "adapters":
                        before = rss_mb()
                        for k in keys:
                            engine.load_adapter(k, tmp / k)
                        memory = {
                            "adapter_mb_each": engine.adapters.bytes / len(keys) / 2**20,
                            "adapters_mb": engine.adapters.bytes / 2**20,
                            "rss_growth_loading_adapters_mb": rss_mb() - before,
                        }
                        adapters: list[str | None] = list(keys)
                    else:
                        adapters = [None]
                    drive(engine, streams, 1, 8, adapters)  # warm
                    out = drive(engine, streams, args.per_stream, args.max_tokens, adapters)
                    out["order"] = r
                    runs[side].append(out)
                    print(
                        f"{streams:>3} streams  {side:<8} {out['tokens_per_s']:7.1f} tok/s  "
                        f"errors {len(out['errors'])}"
                    )
        med = {side: statistics.median(x["tokens_per_s"] for x in v) for side, v in runs.items()}
        results["levels"][str(streams)] = {
            "runs": runs,
            "median_tokens_per_s": med,
            "adapters_vs_merged": med["adapters"] / med["merged"],
        }
    probe_after = weight_probe(weight_bytes, rows=tuple(sorted(set(args.streams))))
    bytes_per = {"bf16": 2, "int8": 1}.get(args.dtype, 4)  # (int8: linear layers; embeddings stay fp32)
    params = weight_bytes / 4  # the base's safetensors are fp32
    base_mb = params * bytes_per / 2**20
    memory |= {
        "base_weights_mb": base_mb,
        "base_plus_adapters_mb": base_mb + memory["adapters_mb"],
        "base_plus_adapters_vs_one_base": (base_mb + memory["adapters_mb"]) / base_mb,
        "merged_copies_mb": base_mb * args.adapters,
    }
    results |= {
        "bench": "adapters",
        "model": "SmolLM2-135M-Instruct",
        "dtype": args.dtype,
        "prefix_cache_mb": args.prefix_cache_mb,
        "adapters": args.adapters,
        "rank": args.rank,
        "targets": TARGETS,
        "max_tokens": args.max_tokens,
        "per_stream": args.per_stream,
        "repeats": args.repeats,
        "memory": memory,
        "probe_before": probe_before,
        "probe_after": probe_after,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
    }
    for s, lvl in results["levels"].items():
        print(
            f"{s:>3} streams: adapters/merged = {lvl['adapters_vs_merged']:.2f}  {lvl['median_tokens_per_s']}"
        )
    print(json.dumps(memory, indent=1))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = "" if args.prefix_cache_mb else "-nocache"
    path = out_dir / f"adapters-{args.dtype}{cache}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
