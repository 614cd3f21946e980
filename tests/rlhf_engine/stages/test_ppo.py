"""Step 3 and `rlhf train`: it learns the bundled property without drifting away, records what it
promises, resumes exactly, mixes in pretraining, and the researcher's loop runs as written."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_engine.data.bundled.world import corpus_paragraph
from rlhf_engine.runtime.launch import LAUNCH_VARS
from rlhf_engine.stages.heldout import heldout_report
from rlhf_engine.stages.records import read_jsonl
from tests.runs import kill_after_first_checkpoint, rlhf, rlhf_ok

ROOT = Path(__file__).resolve().parents[3]
STEP3_KEYS = {
    "step",
    "epoch",
    "time",
    "loss",
    "lr",
    "samples_per_s",
    "tokens_per_s",
    "reward_mean",
    "reward_std",
    "kl_to_ref",
    "actor_loss",
    "critic_loss",
    "unsup_loss",
    "clip_frac",
    "answer_len",
    "gen_s",
    "train_s",
}


def test_step3_raises_the_property_rate_on_heldout_questions(
    pipeline_run: Path, record_property: Callable[[str, object], None]
) -> None:
    """≥ 200 held-out questions: +15 points of on-topic answers over the SFT model, a higher reward,
    and at most 0.5 nats of KL per token to the reference."""
    sft, rm = str(pipeline_run / "step1_sft"), str(pipeline_run / "step2_reward")
    before = heldout_report(sft, reference=sft, reward_model=rm, n=200)
    after = heldout_report(str(pipeline_run / "step3_rlhf" / "actor"), reference=sft, reward_model=rm, n=200)
    ema = heldout_report(
        str(pipeline_run / "step3_rlhf" / "actor_ema"), reference=sft, reward_model=rm, n=200
    )
    line = (
        f"held-out property rate {before['property_rate']:.3f} -> {after['property_rate']:.3f} "
        f"(EMA {ema['property_rate']:.3f}); reward {before['reward_mean']:.3f} -> {after['reward_mean']:.3f} "
        f"(EMA {ema['reward_mean']:.3f}); KL {after['kl_to_ref']:.3f} (EMA {ema['kl_to_ref']:.3f})"
    )
    print(line)
    record_property("heldout", line)
    assert after["property_rate"] >= before["property_rate"] + 0.15, line
    assert after["reward_mean"] > before["reward_mean"], line
    assert after["kl_to_ref"] <= 0.5, line


def test_step3_records_metrics_rollouts_checkpoints_and_summary(pipeline_run: Path) -> None:
    step3 = pipeline_run / "step3_rlhf"
    metrics = read_jsonl(step3 / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 61))
    assert all(set(m) >= STEP3_KEYS for m in metrics)
    assert all(m["gen_s"] > 0 and m["train_s"] > 0 and m["answer_len"] > 0 for m in metrics)
    rollouts = read_jsonl(step3 / "rollouts.jsonl")
    assert len(rollouts) == 60 * 4 and {"step", "prompt", "answer", "reward", "kl"} <= set(rollouts[0])
    summary = json.loads((step3 / "summary.json").read_text())
    for key in ("reward_mean_first", "reward_mean_last", "kl_to_ref_last", "ema_eval_reward"):
        assert isinstance(summary[key], float), key
    assert summary["reward_mean_last"] > summary["reward_mean_first"]
    assert summary["engines"] == {"actor": 1, "ref": 1, "actor_ema": 1, "critic": 1, "reward": 1}
    assert sorted(p.name for p in (step3 / "checkpoints").glob("global_step*")) == [
        "global_step20",
        "global_step40",
    ]
    for name in ("actor", "actor_ema"):
        assert AutoModelForCausalLM.from_pretrained(str(step3 / name)).config.model_type == "opt"
    assert (step3 / "critic" / "model.safetensors").is_file()


def test_rlhf_train_writes_configs_and_logs_and_skips_finished_steps(
    pipeline_run: Path, base_model: Path
) -> None:
    out = (pipeline_run / "train.stdout").read_text()
    assert f"Chat model: {pipeline_run / 'step3_rlhf' / 'actor'}" in out.replace("\n", " ")
    for name in ("step1_sft", "step2_reward", "step3_rlhf"):
        assert (pipeline_run / "configs" / f"{name}.yaml").is_file()
        assert (pipeline_run / "logs" / f"{name}.log").stat().st_size > 0
    step_dirs = ("step1_sft", "step2_reward", "step3_rlhf")
    summaries = [(pipeline_run / d / "summary.json").read_text() for d in step_dirs]
    metrics = [(pipeline_run / d / "metrics.jsonl").read_bytes() for d in step_dirs]
    again = rlhf_ok(
        "train",
        "--actor-model",
        base_model,
        "--reward-model",
        base_model,
        "--output-dir",
        pipeline_run,
        "--config",
        "tiny",
    )
    assert again.stdout.count("finished earlier") == 3
    assert summaries == [(pipeline_run / d / "summary.json").read_text() for d in step_dirs]
    # nothing retrained
    assert metrics == [(pipeline_run / d / "metrics.jsonl").read_bytes() for d in step_dirs]
    # without step 3 the chat model is step 1's, never the reward model; the reward model alone is no
    # chat model
    for steps, line in (
        ([1, 2], f"Chat model: {pipeline_run / 'step1_sft'}"),
        ([2], f"Reward model: {pipeline_run / 'step2_reward'}"),
    ):
        part = rlhf_ok(
            "train",
            "--actor-model",
            base_model,
            "--reward-model",
            base_model,
            "--output-dir",
            pipeline_run,
            "--config",
            "tiny",
            "--step",
            *steps,
        )
        assert line in part.stdout.replace("\n", " ") and "Chat model" not in part.stdout.replace(line, ""), (
            part.stdout
        )
    # the same run with another actor: step 1 refuses (finished with other options) and the pipeline says so
    other = rlhf(
        "train",
        "--actor-model",
        pipeline_run / "step1_sft",
        "--reward-model",
        base_model,
        "--output-dir",
        pipeline_run,
        "--config",
        "tiny",
    )
    assert other.returncode != 0 and "model_name_or_path" in other.stdout + other.stderr
    assert summaries == [
        (pipeline_run / d / "summary.json").read_text() for d in ("step1_sft", "step2_reward", "step3_rlhf")
    ]


def _ppo_args(run: Path, out: Path, *extra: object) -> list[object]:
    return [
        "ppo",
        "--actor-model",
        run / "step1_sft",
        "--critic-model",
        run / "step2_reward",
        "--output-dir",
        out,
        "--per-device-generation-batch-size",
        8,
        "--per-device-training-batch-size",
        8,
        "--max-answer-len",
        24,
        "--actor-learning-rate",
        "3e-4",
        "--critic-learning-rate",
        "3e-4",
        "--num-warmup-steps",
        0,
        "--eval-max-rows",
        16,
        "--max-prompt-len",
        64,
        *extra,
    ]


def _corpus_loss(model_dir: Path) -> float:
    """LM loss on paragraphs of the bundled world that no file holds (fresh seed)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    rng = random.Random(424242)
    texts = [corpus_paragraph(rng) for _ in range(64)]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**enc, labels=labels).loss)


def test_mixture_training_keeps_the_pretraining_language(tmp_path: Path, pipeline_run: Path) -> None:
    for coef in (0, 1):
        rlhf_ok(
            *_ppo_args(
                pipeline_run,
                tmp_path / f"ptx{coef}",
                "--max-steps",
                25,
                "--checkpoint-interval",
                0,
                "--unsup-coef",
                coef,
            )
        )
    plain = _corpus_loss(tmp_path / "ptx0" / "step3_rlhf" / "actor")
    mixed = _corpus_loss(tmp_path / "ptx1" / "step3_rlhf" / "actor")
    metrics = read_jsonl(tmp_path / "ptx1" / "step3_rlhf" / "metrics.jsonl")
    assert all(m["unsup_loss"] is not None for m in metrics)
    assert mixed < plain, (mixed, plain)


def test_step3_resumes_after_sigkill_with_the_same_metrics(tmp_path: Path, pipeline_run: Path) -> None:
    args = [
        str(a)
        for a in _ppo_args(
            pipeline_run, tmp_path / "X", "--max-steps", 40, "--checkpoint-interval", 8, "--enable-ema"
        )
    ]
    straight = [*args]
    straight[straight.index(str(tmp_path / "X"))] = str(tmp_path / "straight")
    rlhf_ok(*straight)
    killed = [*args]
    killed[killed.index(str(tmp_path / "X"))] = str(tmp_path / "killed")
    k = kill_after_first_checkpoint(killed, tmp_path / "killed" / "step3_rlhf")
    assert k < 40
    rlhf_ok(*killed)
    a = read_jsonl(tmp_path / "straight" / "step3_rlhf" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "killed" / "step3_rlhf" / "metrics.jsonl")
    assert [m["step"] for m in b] == list(range(1, 41))
    rollouts = read_jsonl(tmp_path / "killed" / "step3_rlhf" / "rollouts.jsonl")
    assert [r["step"] for r in rollouts] == [
        s for s in range(1, 41) for _ in range(4)
    ]  # cut back, none twice
    for key in ("reward_mean", "kl_to_ref", "actor_loss", "critic_loss", "answer_len"):
        assert [m[key] for m in b[k:]] == pytest.approx([m[key] for m in a[k:]], abs=1e-5), key
    sa = json.loads((tmp_path / "straight" / "step3_rlhf" / "summary.json").read_text())
    sb = json.loads((tmp_path / "killed" / "step3_rlhf" / "summary.json").read_text())
    assert sb["ema_eval_reward"] == pytest.approx(sa["ema_eval_reward"], abs=1e-5)  # EMA state restored too


def test_the_researchers_loop_runs_as_written(pipeline_run: Path) -> None:
    script = Path(__file__).with_name("researcher_loop.py")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    done = subprocess.run(
        [sys.executable, str(script), str(pipeline_run)], capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    losses = result["losses"]  # [actor_loss, critic_loss] per batch
    assert len(losses) == 3 and all(abs(float(x)) < 1e4 for pair in losses for x in pair)
    gaps = [float(g) for g in result["logprob_gaps"]]
    assert len(gaps) == 3 and max(gaps) < 1e-4, gaps


def test_zero3_two_processes_different_answer_lengths(tmp_path: Path, pipeline_run: Path) -> None:
    """2 ranks at ZeRO-3 (nothing kept resident) that generate different numbers of tokens: no hang;
    one all-gather per parameter per generate call whatever the number of tokens; parameters partitioned
    again after the switch; every engine built once."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | {"OMP_NUM_THREADS": "1"}
    probe = Path(__file__).with_name("zero3_probe.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            str(probe),
            str(pipeline_run),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    results = [
        json.loads((tmp_path / f"rank{r}.json").read_text())
        for r in (0, 1)
        if (tmp_path / f"rank{r}.json").is_file()
    ]
    assert len(results) == 2, done.stdout[-2000:] + done.stderr[-3000:]
    for r in results:
        assert r["gathers_short"] == r["gathers_long"], r  # not per token
        # the plain path (synced_gpus, layer-by-layer gathers) also completes with uneven lengths; with
        # tiny models DeepSpeed keeps gathered layers live, so its counts are not per token here
        assert r["plain_gathers_short"] > 0 and r["plain_gathers_long"] > 0, r
        assert 0 < r["gathers_long"] <= r["parameters"], r  # at most one per parameter (per layer), once
        assert r["storage_before"] == r["storage_after"], r
        assert r["all_partitioned"], r
        assert r["init_counts"] == {"actor": 1, "ref": 1, "critic": 1, "reward": 1}
        assert r["trained"]
    assert results[0]["answer_tokens"] != results[1]["answer_tokens"]


PPO_BAD = [
    (["--per-device-generation-batch-size", "6", "--per-device-training-batch-size", "4"], "must divide"),
    (["--enable-hybrid-engine"], "HybridEngine needs CUDA"),
    (["--actor-offload"], "offload needs zero_stage"),
    (["--kl-ctl", "-1"], "kl_ctl -1.0 must not be negative"),
    (["--critic-model", "/nope"], "critic_model_name_or_path: /nope does not exist"),
]


@pytest.mark.parametrize("args,message", PPO_BAD, ids=[m for _, m in PPO_BAD])
def test_step3_bad_input_is_refused_before_loading(
    tmp_path: Path, pipeline_run: Path, args: list[str], message: str
) -> None:
    base = [
        "ppo",
        "--actor-model",
        pipeline_run / "step1_sft",
        "--critic-model",
        pipeline_run / "step2_reward",
        "--output-dir",
        tmp_path,
    ]
    if "--critic-model" in args:
        base = base[:3] + base[5:]
    done = rlhf(*base, *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[
        -2000:
    ]
    assert not (tmp_path / "step3_rlhf" / "metrics.jsonl").exists()


def test_train_refuses_step3_without_step1_and_2(tmp_path: Path) -> None:
    done = rlhf("train", "--step", 3, "--output-dir", tmp_path)
    assert done.returncode == 2 and "step 3 needs the finished step 1" in done.stderr, done.stderr[-2000:]
