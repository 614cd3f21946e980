"""Step 2 on the bundled preference data: ≥ 0.8 held-out accuracy, and a model that scores."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_engine.data.collate import pad
from rlhf_engine.data.formatter import encode_answer, encode_prompt
from rlhf_engine.models.value import ValueModel, sequence_scores
from rlhf_engine.stages.records import read_jsonl


def test_heldout_accuracy_is_at_least_0_8(
    reward_run: Path, record_property: Callable[[str, object], None]
) -> None:
    s = json.loads((reward_run / "summary.json").read_text())
    record_property("eval_accuracy", s["eval_accuracy"])
    print(
        f"reward model held-out accuracy {s['eval_accuracy']:.3f} on {s['eval_pairs']} pairs "
        f"(before training {s['eval_accuracy_before']:.3f})"
    )
    assert s["eval_accuracy"] >= 0.8, s
    assert s["eval_chosen_score_mean"] > s["eval_rejected_score_mean"]
    assert s["eval_score_gap_mean"] == pytest.approx(
        s["eval_chosen_score_mean"] - s["eval_rejected_score_mean"]
    )
    p = s["eval_score_gap_percentiles"]
    assert p["p5"] <= p["p25"] <= p["p50"] <= p["p75"] <= p["p95"]
    metrics = read_jsonl(reward_run / "metrics.jsonl")
    assert {"accuracy", "chosen_score", "rejected_score", "loss"} <= set(metrics[-1])


def _score(model: ValueModel, tok, prompt: str, answer: str) -> float:
    conv = [{"role": "user", "content": prompt}]
    ids, mask = pad([encode_prompt(conv, tok) + encode_answer(conv, answer, tok)], tok.pad_token_id)
    with torch.no_grad():
        return float(sequence_scores(model(ids, mask), mask)[0])


def test_saved_reward_model_loads_back_and_scores_the_property(reward_run: Path) -> None:
    import random

    from rlhf_engine.data.bundled import heldout_questions
    from rlhf_engine.data.bundled.world import answer, off_topic

    tok = AutoTokenizer.from_pretrained(str(reward_run))
    rm = ValueModel(
        AutoModelForSequenceClassification.from_pretrained(str(reward_run)).eval()
    )  # reward model / critic
    rng = random.Random(0)
    wins = []
    for q in heldout_questions()[:100]:  # questions no training file holds
        style, named = rng.getrandbits(32), rng.random() < 0.5
        good = _score(rm, tok, q.text, answer(q, named=named, rng=random.Random(style)))
        bad = _score(
            rm, tok, q.text, answer(q, topics=off_topic(q, rng), named=named, rng=random.Random(style))
        )
        wins.append(good > bad)
    assert sum(wins) >= 90, sum(wins)
    ids, mask = pad([[5, 6, 7], [5, 6]], tok.pad_token_id)
    with torch.no_grad():
        assert rm(ids, mask).shape == (2, 3)  # per-token values, as the critic needs


def test_our_score_is_what_transformers_pools_for_right_padded_input(reward_run: Path) -> None:
    """Anyone loading the folder with plain transformers gets the same reward we trained."""
    tok = AutoTokenizer.from_pretrained(str(reward_run))
    hf = AutoModelForSequenceClassification.from_pretrained(str(reward_run)).eval()
    conv = [{"role": "user", "content": "Where is the fox usually found?"}]
    seqs = [
        encode_prompt(conv, tok) + encode_answer(conv, a, tok)
        for a in ("The fox is found in the cave.", "It is.")
    ]
    ids, mask = pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        ours = sequence_scores(ValueModel(hf)(ids, mask), mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(ours, theirs, atol=1e-5)
