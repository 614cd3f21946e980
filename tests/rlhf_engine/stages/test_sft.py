"""Step 1 on the bundled data: it learns, it records what docs/contracts.md §1 promises, its model loads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_engine.data.formatter import encode_prompt
from rlhf_engine.stages.records import read_jsonl
from tests.runs import rlhf, rlhf_ok

STEPS = 540  # the tiny preset: 2 epochs of 4,320 rows in batches of 16


def test_training_loss_falls_and_heldout_perplexity_drops(sft_run: Path) -> None:
    losses = [m["loss"] for m in read_jsonl(sft_run / "metrics.jsonl")]
    assert len(losses) == STEPS
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["eval_perplexity_after"] < 0.5 * summary["eval_perplexity_before"], summary


def test_metrics_events_summary_and_checkpoints_follow_the_contract(sft_run: Path) -> None:
    for m in read_jsonl(sft_run / "metrics.jsonl"):
        assert {"step", "epoch", "time", "loss", "lr", "samples_per_s", "tokens_per_s"} <= set(m)
        assert m["tokens_per_s"] > 0 and m["samples_per_s"] > 0
    assert [m["step"] for m in read_jsonl(sft_run / "metrics.jsonl")] == list(range(1, STEPS + 1))
    events = read_jsonl(sft_run / "events.jsonl")
    types = [e["type"] for e in events]
    assert types[0] == "step_started" and types[-1] == "step_finished"
    assert types.count("eval") == 2  # before and after
    saved = [e["data"] for e in events if e["type"] == "checkpoint_saved"]
    assert [s["global_step"] for s in saved] == list(range(50, STEPS, 50))
    assert all({"time", "level", "type", "message", "data"} <= set(e) for e in events)
    # keep the last 2 checkpoints, each complete (trainer state + RNG of every rank)
    kept = sorted(p.name for p in (sft_run / "checkpoints").glob("global_step*"))
    assert kept == ["global_step450", "global_step500"]
    assert (sft_run / "checkpoints" / "global_step500" / "trainer_state.json").is_file()
    assert (sft_run / "checkpoints" / "global_step500" / "rng_state_rank0.safetensors").is_file()


def test_saved_model_loads_back_and_generates(sft_run: Path, base_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(sft_run))
    model = AutoModelForCausalLM.from_pretrained(str(sft_run)).eval()
    assert not list(sft_run.glob("*.bin"))  # safetensors only
    # the tokenizer files are the input model's, unchanged (still loadable by transformers 4.x)
    assert (sft_run / "tokenizer_config.json").read_bytes() == (
        base_model / "tokenizer_config.json"
    ).read_bytes()
    ids = torch.tensor([encode_prompt([{"role": "user", "content": "What color is the dog?"}], tok)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert " is " in answer, answer  # it answers in the bundled language ("It is brown." …)


def test_a_finished_step_is_not_retrained(sft_run: Path) -> None:
    config = sft_run.parent / "configs" / "step1_sft.yaml"  # what `rlhf train` ran it with
    before = (sft_run / "summary.json").read_text()
    mtime = (sft_run / "model.safetensors").stat().st_mtime_ns
    rlhf_ok("sft", "--config", config)  # same options: nothing to do
    changed = rlhf("sft", "--config", config, "--learning-rate", "1e-4")
    assert (
        changed.returncode == 2 and "already finished" in changed.stderr and "learning_rate" in changed.stderr
    )
    assert (sft_run / "summary.json").read_text() == before
    assert (sft_run / "model.safetensors").stat().st_mtime_ns == mtime
