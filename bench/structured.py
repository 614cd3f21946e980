"""Structured outputs: what constrained decoding costs, and why llguidance is the grammar engine.

    throughput     SmolLM2-135M-Instruct in one ChatGenerator, `--streams` replies decoding together,
                   each `--tokens` tokens long: plain (ignore_eos: every reply runs to the end) against
                   the same under a JSON schema whose one string must be long (so every reply also runs
                   to the end) — completion tokens/s, alternating the two, median of `--rounds`.
    engines        each grammar engine importable here on SmolLM2's tokenizer (49,152 tokens): the
                   schema's compile time and the time to compute one next-token mask, over the tokens
                   of a valid reply. llguidance is a dependency; xgrammar and outlines-core are measured
                   when importable (pip install --no-deps --target DIR xgrammar apache-tvm-ffi
                   outlines-core; PYTHONPATH=DIR:. — outlines-core builds its vocabulary from the hub
                   only, so offline it reports why it was not measured).

JSON goes to bench/results/ with the machine probe of the same run.

    python bench/structured.py [--streams 8 --tokens 96 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from step3 import machine_probe

ROOT = Path(__file__).resolve().parents[1]
LONG = {  # a reply that cannot end before max_new_tokens: one string of at least 2,000 characters
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
    "additionalProperties": False,
}
PET = {  # the schema of the engines' comparison (the tests' nested one)
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["dog", "cat", "owl"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "toys": {"type": "array", "items": {"enum": ["ball", "kite", "book"]}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "toys"],
    "additionalProperties": False,
}
REPLY = '{"name":"Rex","kind":"dog","age":4,"toys":["ball","kite"]}'


def throughput(path: str, streams: int, tokens: int, rounds: int) -> dict[str, Any]:
    from rlhf_engine.chat import ChatGenerator, SamplingParams
    from rlhf_engine.chat.structured import grammar_of

    grammar = grammar_of({"type": "json_schema", "json_schema": {"name": "long", "schema": LONG}})
    ask = [{"role": "user", "content": "Tell me a long story about a dog, as JSON."}]
    out: dict[str, list[float]] = {"plain": [], "constrained": []}
    with ChatGenerator.load(path, backend="transformers") as engine:
        for _ in range(rounds):
            for mode in ("plain", "constrained"):
                params = [
                    SamplingParams(
                        max_new_tokens=tokens,
                        seed=i,
                        ignore_eos=mode == "plain",
                        grammar=grammar if mode == "constrained" else None,
                    )
                    for i in range(streams)
                ]
                started = time.perf_counter()
                handles = [engine.submit(ask, p) for p in params]
                done = sum(len(h.result().choices[0].token_ids) for h in handles)
                out[mode].append(done / (time.perf_counter() - started))
                assert done == streams * tokens, (mode, done)
    plain, shaped = statistics.median(out["plain"]), statistics.median(out["constrained"])
    return {
        "streams": streams,
        "tokens_per_reply": tokens,
        "plain_tokens_per_s": plain,
        "constrained_tokens_per_s": shaped,
        "cost": 1 - shaped / plain,
        "rounds": out,
    }


def engines(path: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(path)
    ids = tok(REPLY, add_special_tokens=False)["input_ids"]
    size = len(tok)
    out: dict[str, Any] = {"vocab": size, "reply_tokens": len(ids)}

    import llguidance
    import llguidance.hf
    import torch

    started = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=size)
    tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(PET))
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - started
    mask = torch.full((1, (size + 31) // 32), -1, dtype=torch.int32)
    times = []
    for t in ids:
        started = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
        times.append(time.perf_counter() - started)
        assert matcher.consume_token(t), matcher.get_error()
    out["llguidance"] = {
        "version": llguidance.get_version() if hasattr(llguidance, "get_version") else "",
        "tokenizer_s": tokenizer_s,
        "compile_s": compile_s,
        "mask_us_median": statistics.median(times) * 1e6,
        "mask_us_max": max(times) * 1e6,
    }
    try:
        import xgrammar as xgr  # type: ignore[import-not-found]

        started = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=size)
        compiler = xgr.GrammarCompiler(info)
        tokenizer_s = time.perf_counter() - started
        started = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(PET))
        m = xgr.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - started
        bitmask = xgr.allocate_token_bitmask(1, size)
        times = []
        for t in ids:
            started = time.perf_counter()
            m.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - started)
            assert m.accept_token(t)
        out["xgrammar"] = {
            "version": getattr(xgr, "__version__", ""),
            "tokenizer_s": tokenizer_s,
            "compile_s": compile_s,
            "mask_us_median": statistics.median(times) * 1e6,
            "mask_us_max": max(times) * 1e6,
        }
    except ImportError as e:
        out["xgrammar"] = f"not importable here: {e}"
    try:
        from outlines_core import Guide, Index, Vocabulary  # type: ignore[import-not-found]
        from outlines_core.json_schema import build_regex_from_schema  # type: ignore[import-not-found]

        started = time.perf_counter()
        vocabulary = Vocabulary.from_pretrained(path)
        tokenizer_s = time.perf_counter() - started
        started = time.perf_counter()
        index = Index(build_regex_from_schema(json.dumps(PET)), vocabulary)
        guide = Guide(index)
        compile_s = time.perf_counter() - started
        times = []
        for t in ids:
            started = time.perf_counter()
            guide.get_tokens()
            times.append(time.perf_counter() - started)
            guide.advance(t)
        out["outlines_core"] = {
            "tokenizer_s": tokenizer_s,
            "compile_s": compile_s,
            "mask_us_median": statistics.median(times) * 1e6,
            "mask_us_max": max(times) * 1e6,
        }
    except Exception as e:  # not installed, or its vocabulary needs the hub
        out["outlines_core"] = f"not measured: {type(e).__name__}: {e}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from rlhf_engine.models.gguf import build_smollm2

    path = str(build_smollm2())
    out: dict[str, Any] = {
        "machine": machine_probe(),
        "model": "SmolLM2-135M-Instruct",
        "throughput": throughput(path, args.streams, args.tokens, args.rounds),
        "engines": engines(path),
        "machine_after": machine_probe(),
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    target = results / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(out, indent=1))
    print(
        json.dumps(
            {k: v for k, v in out.items() if k != "throughput"}
            | {"throughput": {k: v for k, v in out["throughput"].items() if k != "rounds"}},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
