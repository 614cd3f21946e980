"""Step 3 with `--algorithm grpo|rloo` on the shared run's SFT and reward models: no critic, several
answers per prompt, advantages from the group; it learns, resumes exactly after a kill, and refuses
options that cannot work before loading anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_engine.stages.records import read_jsonl
from tests.runs import kill_after_first_checkpoint, rlhf, rlhf_ok

SMALL = [
    "--samples-per-prompt",
    4,
    "--per-device-generation-batch-size",
    4,
    "--per-device-training-batch-size",
    16,
    "--max-answer-len",
    32,
    "--actor-learning-rate",
    3e-4,
    "--num-warmup-steps",
    0,
    "--eval-max-rows",
    64,
    "--max-seq-len",
    128,
    "--max-prompt-len",
    64,
]


def _args(pipeline_run: Path, out: Path, *extra: object) -> list[object]:
    return [
        "ppo",
        "--actor-model",
        pipeline_run / "step1_sft",
        "--reward-model",
        pipeline_run / "step2_reward",
        "--output-dir",
        out,
        *SMALL,
        *extra,
    ]


GRPO = ["--algorithm", "grpo", "--max-steps", 30, "--checkpoint-interval", 10]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory: pytest.TempPathFactory, pipeline_run: Path) -> Path:
    out = tmp_path_factory.mktemp("grpo")
    rlhf_ok(*_args(pipeline_run, out, *GRPO))
    return out / "step3_rlhf"


def test_grpo_raises_the_reward_with_no_critic(grpo_run: Path) -> None:
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["algorithm"] == "grpo"
    assert summary["engines"] == {"actor": 1, "ref": 1, "reward": 1}  # no critic loaded, trained or saved
    assert sorted(p.name for p in grpo_run.iterdir() if p.is_dir()) == ["actor", "checkpoints"]
    # measured: held-out reward −4.2 → 0.1 in 30 steps (on topic 39% → 73% by `rlhf eval`)
    assert summary["eval_reward_after"] > summary["eval_reward_before"] + 2.0, summary
    assert summary["eval_kl_to_ref_after"] < 0.5, summary
    assert summary["peak_rss_mib"] > 0
    metrics = read_jsonl(grpo_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert all(
        m["critic_loss"] is None and m["critic_lr"] is None and m["filtered_rate"] == 0.0 for m in metrics
    )
    assert read_jsonl(grpo_run / "events.jsonl")[0]["message"].startswith(
        "step 3 (GRPO): 30 steps of 4 prompts"
    )
    started = read_jsonl(grpo_run / "events.jsonl")[0]["data"]
    assert started["algorithm"] == "grpo" and started["samples_per_prompt"] == 4
    # every rollout line is one answer; the first step's four come from one prompt (one group)
    first = [r for r in read_jsonl(grpo_run / "rollouts.jsonl") if r["step"] == 1]
    assert len(first) == 4 and len({r["prompt"] for r in first}) == 1


def test_a_killed_grpo_run_resumes_with_identical_metrics(
    grpo_run: Path, pipeline_run: Path, tmp_path: Path
) -> None:
    args = _args(pipeline_run, tmp_path, *GRPO)
    assert kill_after_first_checkpoint(args, tmp_path / "step3_rlhf") == 10
    rlhf_ok(*args)
    resumed = read_jsonl(tmp_path / "step3_rlhf" / "metrics.jsonl")
    straight = read_jsonl(grpo_run / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, 31))
    for key in ("reward_mean", "loss", "kl_to_ref", "answer_len"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in straight], abs=1e-6), key


def test_rloo_with_the_kl_in_the_loss_and_filtered_groups(pipeline_run: Path, tmp_path: Path) -> None:
    rlhf_ok(
        *_args(
            pipeline_run,
            tmp_path,
            "--algorithm",
            "rloo",
            "--kl-in",
            "loss",
            "--filter-groups",
            "--max-steps",
            4,
            "--eval-max-rows",
            16,
        )
    )
    metrics = read_jsonl(tmp_path / "step3_rlhf" / "metrics.jsonl")
    assert len(metrics) == 4
    assert all(
        m["kl_loss"] >= 0 and 0 <= m["filtered_rate"] <= 1 and m["critic_loss"] is None for m in metrics
    )
    assert (
        metrics[-1]["kl_loss"] > 0
    )  # the actor moved away from the reference, and the loss says by how much
    assert json.loads((tmp_path / "step3_rlhf" / "summary.json").read_text())["algorithm"] == "rloo"


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--algorithm", "grpo"], "samples_per_prompt"),  # the default 1 answer per prompt makes no group
        (["--algorithm", "rloo", "--samples-per-prompt", 1], "samples_per_prompt"),
        (["--kl-in", "loss"], "kl_in"),  # PPO has its KL in the reward
        (["--algorithm", "reinforce"], "--algorithm"),
    ],
)
def test_group_options_that_cannot_work_are_refused(
    flags: list[object], field: str, pipeline_run: Path, tmp_path: Path
) -> None:
    done = rlhf(
        "ppo",
        "--actor-model",
        pipeline_run / "step1_sft",
        "--critic-model",
        pipeline_run / "step2_reward",
        "--output-dir",
        tmp_path,
        *flags,
    )
    assert done.returncode == 2 and field in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "step3_rlhf").exists()
