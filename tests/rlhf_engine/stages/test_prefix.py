"""Step 3's shared prompt start (engine/prefix.py): found, laid out first, run once — and the answers,
their generation logits and the reference model's log-probs are those of the left-padded batch, on
every architecture of the kit without sliding-window layers (those are excluded, and so are ZeRO-3
ranks that would run different passes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_engine.models.tiny import ARCHS, build_tiny
from rlhf_engine.runtime.generation import cache_kwarg, lm_logits
from rlhf_engine.runtime.kv_cache import reserved_cache
from rlhf_engine.runtime.launch import LAUNCH_VARS
from rlhf_engine.runtime.prefix import has_sliding_layers, prefix_cache, prefix_first, shared_prefix_len

PAD = 1


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_the_shared_start_is_found_and_laid_out_first_keeping_each_rows_tokens() -> None:
    start = [11, 12, 13, 14, 15]
    rows = [[*start, 20, 21, 22], [*start, 30], [*start, 40, 41], [*start, 20, 21, 22]]
    ids, mask = left_padded(rows)
    assert shared_prefix_len(ids, mask) == 5
    assert shared_prefix_len(ids[:1], mask[:1]) == 0  # one row: nothing shared
    same, same_mask = left_padded([[*start, 1], [*start, 1]])
    assert shared_prefix_len(same, same_mask) == 5  # never the whole prompt: its last token must be fed
    out, out_mask = prefix_first(ids, mask, 5, PAD)
    assert out.shape == ids.shape
    assert out[1].tolist() == [*start, PAD, PAD, 30] and out_mask[1].tolist() == [1] * 5 + [0, 0, 1]
    for r, row in enumerate(rows):
        assert out[r][out_mask[r] > 0].tolist() == row
        assert out[r, :5].tolist() == start
    assert shared_prefix_len(*left_padded([[1, 2, 3], [9, 2, 3]])) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_and_scoring_from_the_shared_start_equal_the_left_padded_batch(arch: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(build_tiny(arch, "xs")).eval()  # type: ignore[arg-type]
    if has_sliding_layers(model.config):
        pytest.skip(f"{arch} has sliding-window layers: step 3 keeps its prompts left-padded")
    g = torch.Generator().manual_seed(5)
    start = torch.randint(5, model.config.vocab_size, (12,), generator=g).tolist()
    rows = [
        start + torch.randint(5, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 7, 1, 5)
    ]
    ids, mask = left_padded(rows)
    k = shared_prefix_len(ids, mask)
    assert k == 12
    relaid, relaid_mask = prefix_first(ids, mask, k, PAD)
    greedy = {
        "max_new_tokens": 10,
        "min_new_tokens": 10,
        "do_sample": False,
        "pad_token_id": PAD,
        "return_dict_in_generate": True,
        "output_logits": True,
    }
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, **greedy)
        cache = prefix_cache(model, relaid[0, :k], len(rows), reserved_cache(model, ids.shape[1] - k + 10))
        shared = model.generate(relaid, attention_mask=relaid_mask, **greedy, **{cache_kwarg(model): cache})
    P = ids.shape[1]
    assert torch.equal(shared.sequences[:, P:], plain.sequences[:, P:])  # the same answers
    for a, b in zip(plain.logits, shared.logits, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-4)
    # the reference model's scoring pass over prompt + answer, with the start from its cache
    answers = plain.sequences[:, P:]
    full_mask = torch.cat([mask, torch.ones_like(answers)], 1)
    relaid_full = torch.cat([relaid_mask, torch.ones_like(answers)], 1)
    with torch.no_grad():
        want = lm_logits(model, plain.sequences, full_mask, keep_last=11)
        ref_cache = prefix_cache(model, relaid[0, :k], len(rows))
        got = lm_logits(model, shared.sequences, relaid_full, keep_last=11, cache=ref_cache, cached=k)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_ppo_experience_from_the_shared_start_equals_the_left_padded_one() -> None:
    """A chat template's system prompt (SmolLM2's tokenizer on a tiny Llama): step 3 runs it once, and
    the experience — answers, actor and reference log-probs, values, rewards — is the left-padded one's;
    so are the policy's log-probs and gradients in the training pass."""
    actor = build_tiny("llama", "xs", tokenizer_from="smollm2")
    script = Path(__file__).with_name("prefix_probe.py")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    done = subprocess.run(
        [sys.executable, str(script), str(actor), str(actor)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # the system prompt, the user header
    assert out["shared_columns"] >= 20 and out["shared_columns_equal"] is True, done.stdout
    assert out["same_answers"] is True and out["start_once_in_training"] is True, done.stdout
    for name in ("logprobs", "ref_logprobs", "values", "scores", "policy"):
        assert out["gaps"][name] < 1e-4, (name, done.stdout)
    assert out["gaps"]["grads"] < 1e-3, done.stdout  # relative to each gradient's largest entry
    counts = out["grads"]
    assert counts[0] == counts[1] and counts[0] > 10  # every trained parameter compared
    assert len(out["losses"]) == 2, done.stdout
