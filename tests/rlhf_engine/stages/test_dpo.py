"""`rlhf dpo` (DeepSpeed-Chat's step2_dpo) on the step-1 model of the shared run: it learns the
held-out preferences, records its implicit rewards, saves a chat model, resumes exactly after a kill,
and refuses options that cannot work before loading anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from rlhf_engine.chat.loading import resolve_model_dir
from rlhf_engine.data.collate import collate_pairs
from rlhf_engine.stages.dpo import answer_token_logps
from rlhf_engine.stages.heldout import heldout_report
from rlhf_engine.stages.records import read_jsonl
from tests.runs import kill_after_first_checkpoint, rlhf, rlhf_ok

ARGS = [
    "dpo",
    "--max-steps",
    24,
    "--learning-rate",
    1e-4,
    "--per-device-train-batch-size",
    8,
    "--checkpoint-interval",
    8,
    "--max-seq-len",
    128,
    "--eval-max-rows",
    96,
]
PREFERENCE_METRICS = {
    "loss",
    "rewards_chosen",
    "rewards_rejected",
    "rewards_margin",
    "rewards_accuracy",
    "chosen_nll",
}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, sft_run: Path) -> Path:
    out = tmp_path_factory.mktemp("dpo")
    rlhf_ok(*ARGS, "--model", sft_run, "--output-dir", out)
    return out / "step2_dpo"


def test_dpo_learns_the_held_out_preferences(dpo_run: Path) -> None:
    summary = json.loads((dpo_run / "summary.json").read_text())
    # before training the reference is the model itself: every implicit reward is 0, the loss log 2
    assert summary["eval_loss_before"] == pytest.approx(0.693147, abs=1e-5)
    assert summary["eval_rewards_accuracy_before"] == 0.0
    assert summary["eval_loss_after"] < 0.65, summary
    assert summary["eval_rewards_accuracy_after"] >= 0.8, summary
    assert summary["eval_rewards_margin_after"] > 0.1, summary  # measured 0.17
    assert summary["eval_pairs"] == 96


def test_dpo_records_implicit_rewards_every_step(dpo_run: Path) -> None:
    metrics = read_jsonl(dpo_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert all(PREFERENCE_METRICS | {"lr", "samples_per_s", "tokens_per_s"} <= set(m) for m in metrics)
    first, last = metrics[:4], metrics[-4:]
    assert sum(m["rewards_margin"] for m in last) > sum(m["rewards_margin"] for m in first)
    events = read_jsonl(dpo_run / "events.jsonl")
    started = events[0]
    assert started["type"] == "step_started" and started["message"].endswith("steps of 8 pairs")
    assert (
        started["data"]["reference"] == "the model's starting weights"
        and started["data"]["loss"] == "sigmoid"
    )
    assert [e["data"]["global_step"] for e in events if e["type"] == "checkpoint_saved"] == [8, 16]
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["data"]["global_step"] for e in evals] == [0, 24] and "rewards_accuracy" in evals[-1]["data"]


def test_the_dpo_model_is_a_chat_model_that_loads_anywhere(dpo_run: Path, sft_run: Path) -> None:
    assert not list(dpo_run.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(str(dpo_run)).eval()
    before = AutoModelForCausalLM.from_pretrained(str(sft_run)).eval()
    changed = [
        n
        for (n, p), (_, q) in zip(model.named_parameters(), before.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert changed, "DPO left every weight as it was"
    assert (dpo_run / "tokenizer_config.json").read_bytes() == (
        sft_run / "tokenizer_config.json"
    ).read_bytes()


def test_a_killed_dpo_run_resumes_with_identical_metrics(
    dpo_run: Path, sft_run: Path, tmp_path: Path
) -> None:
    args = [*ARGS, "--model", sft_run, "--output-dir", tmp_path]
    at = kill_after_first_checkpoint(args, tmp_path / "step2_dpo")
    assert at == 8
    rlhf_ok(*args)
    resumed = read_jsonl(tmp_path / "step2_dpo" / "metrics.jsonl")
    straight = read_jsonl(dpo_run / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, 25))
    for key in ("loss", "rewards_margin", "rewards_accuracy"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in straight], abs=1e-6), key
    done = json.loads((tmp_path / "step2_dpo" / "summary.json").read_text())
    assert done["eval_loss_after"] == pytest.approx(
        json.loads((dpo_run / "summary.json").read_text())["eval_loss_after"]
    )


@pytest.mark.parametrize(
    "variant", [["--loss", "ipo"], ["--loss", "simpo", "--rpo-alpha", 0.5]], ids=["ipo", "simpo+rpo"]
)
def test_ipo_and_reference_free_simpo_with_the_rpo_term(
    variant: list[object], sft_run: Path, tmp_path: Path
) -> None:
    rlhf_ok(
        "dpo",
        "--model",
        sft_run,
        "--output-dir",
        tmp_path,
        "--max-steps",
        3,
        "--max-seq-len",
        128,
        "--eval-max-rows",
        16,
        "--learning-rate",
        1e-4,
        *variant,
    )
    step_dir = tmp_path / "step2_dpo"
    started = read_jsonl(step_dir / "events.jsonl")[0]["data"]
    assert started["loss"] == variant[1]
    assert started["reference"] == ("none" if variant[1] == "simpo" else "the model's starting weights")
    metrics = read_jsonl(step_dir / "metrics.jsonl")
    assert len(metrics) == 3 and all(set(m) >= PREFERENCE_METRICS for m in metrics)
    if variant[1] == "simpo":  # no reference: the rewards are β times the answers' mean log-probs, below 0
        assert metrics[0]["rewards_chosen"] < 0 and metrics[0]["rewards_rejected"] < 0


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--loss", "simpo", "--offload-reference-model"], "offload_reference_model"),
        (["--beta", 0], "beta"),
        (["--label-smoothing", 0.5], "label_smoothing"),
        (["--loss", "ipo", "--label-smoothing", 0.1], "label_smoothing"),
        (["--loss", "kto"], "--loss"),
    ],
)
def test_options_that_cannot_work_are_refused_naming_the_field(
    flags: list[object], field: str, tmp_path: Path, sft_run: Path
) -> None:
    done = rlhf("dpo", "--model", sft_run, "--output-dir", tmp_path, *flags)
    assert done.returncode == 2 and field in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "step2_dpo").exists()


def test_answer_log_probs_cover_exactly_the_answer_tokens(sft_run: Path) -> None:
    """Position t of the result scores token t+1; only answer tokens (after the prompt, before the
    padding) count — checked against log-softmax computed by hand."""
    model = AutoModelForCausalLM.from_pretrained(str(sft_run)).eval()
    rows = [{"chosen_ids": [5, 6, 7, 8, 9], "rejected_ids": [5, 6, 7, 10], "prompt_len": 3}]
    batch = collate_pairs(rows, pad_id=1)
    with torch.no_grad():
        logps, answer = answer_token_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert answer.tolist() == [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    table = torch.log_softmax(logits.float(), dim=-1)
    assert logps[0, 2].item() == pytest.approx(table[0, 2, 8].item(), abs=1e-5)  # token 8 after "5 6 7"
    assert logps[0, 3].item() == pytest.approx(table[0, 3, 9].item(), abs=1e-5)
    assert logps[1, 2].item() == pytest.approx(table[1, 2, 10].item(), abs=1e-5)


def test_rlhf_train_method_dpo_runs_step_1_then_dpo(
    pipeline_run: Path, base_model: Path, tmp_path: Path
) -> None:
    """`rlhf train --method dpo --config tiny`: step 1 (here finished earlier with the same options: checked,
    not retrained), then DPO with the preset's `dpo:` section; the chat model is step2_dpo/."""
    shutil.copytree(pipeline_run / "step1_sft", tmp_path / "step1_sft")
    sft_weights = (tmp_path / "step1_sft" / "model.safetensors").read_bytes()
    done = rlhf(
        "train", "--method", "dpo", "--actor-model", base_model, "--output-dir", tmp_path, "--config", "tiny"
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"Chat model: {tmp_path / 'step2_dpo'}" in " ".join(done.stdout.split())
    assert "step 1 (SFT): finished earlier" in done.stdout and "step 2 (DPO): done" in done.stdout
    assert (tmp_path / "step1_sft" / "model.safetensors").read_bytes() == sft_weights
    assert not (tmp_path / "step2_reward").exists() and not (tmp_path / "step3_rlhf").exists()
    ran_with = yaml.safe_load((tmp_path / "configs" / "step2_dpo.yaml").read_text())
    assert ran_with["model_name_or_path"] == str(tmp_path / "step1_sft")
    summary = json.loads((tmp_path / "step2_dpo" / "summary.json").read_text())
    assert summary["eval_rewards_accuracy_after"] >= 0.9, summary
    assert (tmp_path / "logs" / "step2_dpo.log").is_file()
    # `rlhf chat --path RUN` (and serving a run directory) picks the run's chat model: DPO's, not step 1's
    assert resolve_model_dir(str(tmp_path)) == ((tmp_path / "step2_dpo").resolve(), tmp_path.resolve())
    # it learns what the preference data prefers: on 200 held-out questions (measured: on topic 39% → 82%,
    # KL 0.32 nats/token to the SFT model) — the reward model only reports, DPO never saw it
    sft, reward = str(tmp_path / "step1_sft"), str(pipeline_run / "step2_reward")
    before = heldout_report(sft, reference=sft, reward_model=reward)
    after = heldout_report(str(tmp_path / "step2_dpo"), reference=sft, reward_model=reward)
    assert after["property_rate"] >= before["property_rate"] + 0.15, (before, after)
    assert after["kl_to_ref"] <= 0.5, after


def test_a_reward_model_is_not_asked_for_by_method_dpo_and_step_3_is_refused(tmp_path: Path) -> None:
    done = rlhf("train", "--method", "dpo", "--actor-model", "x", "--step", 3, "--output-dir", tmp_path)
    assert done.returncode == 2 and "method dpo has steps 1 2" in done.stderr, done.stderr[-2000:]
