"""The memory planner: arithmetic checked by hand, its choice, `rlhf plan`, and DeepSpeed-Chat's tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rlhf_engine import planner as pl

ROOT = Path(__file__).resolve().parents[2]
# a round shape for hand arithmetic: 1e9 parameters, 10 layers of hidden 1000, MLP 4000, vocabulary 1000
SHAPE = pl.Shape(
    params=10**9, layers=10, hidden=1000, heads=10, kv_heads=10, vocab=1000, ffn=4000, gated=False
)
SMALL = pl.Shape(params=10**8, layers=4, hidden=500, heads=5, kv_heads=5, vocab=1000, ffn=2000, gated=False)


def parts(p: pl.StepPlan) -> dict[tuple[str, str], float]:
    return {(x.model, x.what): x.bytes for x in p.parts}


def test_sft_at_zero_0_by_hand() -> None:
    w = pl.Workload(method="sft", seq_len=100, micro_batch=2, dtype_bytes=2)
    p = pl.plan_step(w, SHAPE, None, pl.Setup(), gpus=1, gpu_bytes=80 * pl.GiB)
    got = parts(p)
    assert got[("actor", "weights")] == 2e9
    assert got[("actor", "optimizer")] == 12e9  # fp32 master, m and v
    assert (
        "actor",
        "gradients",
    ) not in got  # set to None between steps: they exist from backward to the step
    # per layer and token 2 B × (6·1000 + 2·4000) = 28,000 B; × 2 × 100 tokens × 10 layers = 56e6;
    # logits 2 × 100 × 1000 × (2 + 4 + 4) = 2e6;
    # backward's first gradients 2 × 100 × 1000 × 4 + 1000 × 1000 × 2 = 2.8e6
    assert p.phase_bytes["training"] == 56e6 + 2e6 + 2.8e6
    # the optimizer step: fp32 gradients (4e9) and torch AdamW's fp32 temporaries (4e9)
    assert p.phase_bytes["optimizer step"] == 8e9 and p.peak_phase == "optimizer step"
    assert "save" not in p.phase_bytes  # saving gathers CPU copies: host memory, not the GPU's
    assert p.total_bytes == pytest.approx((14e9 + 8e9) * 1.1 + pl.GiB)
    # with checkpointing: 2 × 100 tokens × (10 layers × 2 B × 1000 + one layer's 28,000 B) + logits
    assert p.activations_with_checkpointing == 2 * 100 * (10 * 2 * 1000 + 28_000) + 2e6
    assert p.activations_without_checkpointing == 58e6
    on_cpu = pl.plan_step(pl.replace(w, dtype_bytes=4), SHAPE, None, pl.Setup(), gpus=1)
    assert parts(on_cpu)[("actor", "optimizer")] == 8e9  # fp32: AdamW's m and v, no master copy
    assert on_cpu.phase_bytes["save"] == 4e9 and on_cpu.total_bytes == pytest.approx((4e9 + 8e9 + 8e9) * 1.1)


def test_zero_stages_divide_what_they_partition() -> None:
    w = pl.Workload(method="sft", seq_len=100, micro_batch=2)
    by_stage = {z: parts(pl.plan_step(w, SHAPE, None, pl.Setup(zero_stage=z), gpus=8)) for z in (1, 2, 3)}
    assert by_stage[1][("actor", "optimizer")] == 12e9 / 8 and by_stage[1][("actor", "gradients")] == 4e9
    assert by_stage[2][("actor", "gradients")] == 4e9 / 8 and by_stage[2][("actor", "weights")] == 2e9
    assert by_stage[1][("actor", "ZeRO buckets")] == 2 * 5e8 * 2  # reduce and all-gather, 5e8 elements each
    assert by_stage[3][("actor", "weights")] == 2e9 / 8
    assert by_stage[3][("actor", "gradients")] == 2 * 4e9 / 8  # a flat buffer and the partitions
    # ZeRO-3 gathers layers as it goes: two layers (2 × 1e9 / 10) and the 5e7-element prefetch bucket, × 2 B
    assert by_stage[3][("largest model", "ZeRO-3 working set")] == (2 * 1e8 + 5e7) * 2
    small = parts(pl.plan_step(w, SMALL, None, pl.Setup(zero_stage=2), gpus=8))
    assert (
        small[("actor", "ZeRO buckets")] == 2 * 1e8 * 2
    )  # capped at the trainable count (as our configs are)


def test_offload_moves_the_optimizer_and_parameters_to_host_memory() -> None:
    w = pl.Workload(method="sft", seq_len=100, micro_batch=2)
    two = pl.plan_step(w, SHAPE, None, pl.Setup(zero_stage=2, offload=True), gpus=4, gpus_per_node=4)
    assert parts(two)[("actor", "optimizer")] == 0 and parts(two)[("actor", "weights")] == 2e9
    assert two.host_bytes_per_node == (12e9 / 4 + 4e9 / 4) * 4  # each rank's optimizer and gradient shards
    assert two.phase_bytes["optimizer step"] == 0  # DeepSpeed's CPU Adam steps in host memory
    three = pl.plan_step(w, SHAPE, None, pl.Setup(zero_stage=3, offload=True), gpus=4, gpus_per_node=4)
    assert parts(three)[("actor", "weights")] == 0
    assert three.host_bytes_per_node == (2e9 / 4 + 12e9 / 4 + 2 * 4e9 / 4) * 4
    starved = pl.plan_step(
        w,
        SHAPE,
        None,
        pl.Setup(zero_stage=3, offload=True),
        gpus=4,
        gpus_per_node=4,
        gpu_bytes=80 * pl.GiB,
        host_bytes=1e9,
    )
    assert not starved.fits  # the GPU has room; the host has not


def test_lora_trains_the_adapters_only() -> None:
    r = 8
    # q, k, v, o: r × (1000 + 1000) each; MLP: r × (1000 + 4000) twice; × 10 layers
    assert SHAPE.lora_params(r) == 10 * (4 * r * 2000 + 2 * r * 5000)
    w = pl.Workload(method="sft", seq_len=100, micro_batch=2)
    got = parts(pl.plan_step(w, SHAPE, None, pl.Setup(lora_dim=r), gpus=1))
    assert got[("actor", "weights")] == 2e9 and got[("actor", "optimizer")] == SHAPE.lora_params(r) * 12
    gqa = pl.Shape(
        params=10**9, layers=10, hidden=1000, heads=10, kv_heads=2, vocab=1000, ffn=3000, gated=True
    )
    assert gqa.kv_hidden == 200 and gqa.lora_params(r) == 10 * (r * 4000 + r * 2400 + 3 * r * 4000)


def test_ppo_holds_four_models_and_peaks_in_its_largest_phase() -> None:
    w = pl.Workload(method="ppo", prompt_len=60, answer_len=40, micro_batch=2, generation_batch=4, ema=True)
    p = pl.plan_step(w, SHAPE, SMALL, pl.Setup(), gpus=1, gpu_bytes=80 * pl.GiB)
    got = parts(p)
    assert got[("reference", "weights (frozen)")] == 2e9 and got[("actor EMA", "weights (frozen)")] == 2e9
    assert got[("critic", "optimizer")] == 12e8 and got[("reward model", "weights (frozen)")] == 2e8
    assert got[("actor", "KV cache (generation)")] == 2 * 10 * 4 * 100 * 1000 * 2  # 2 × L × B × T × H_kv × b
    assert p.phase_bytes["generation"] == 2 * 10 * 4 * 100 * 1000 * 2 + 4 * 1000 * 4
    # the log-probs of the answer's 41 positions only, not the prompt's: the LM head runs over those
    assert p.phase_bytes["experience"] == 4 * 41 * 1000 * 10
    assert p.phase_bytes["actor optimizer step"] == 8e9 and p.phase_bytes["critic optimizer step"] == 8e8
    assert p.peak_phase == "actor optimizer step"
    resident = 2e9 + 12e9 + 2e9 + 2e9 + (2e8 + 12e8) + 2e8
    assert p.static_bytes == resident
    assert p.total_bytes == pytest.approx((resident + 8e9) * 1.1 + pl.GiB)
    grpo = pl.plan_step(
        pl.Workload(
            method="grpo", micro_batch=2, generation_batch=4, samples_per_prompt=4, reward_model=False
        ),
        SHAPE,
        None,
        pl.Setup(),
        gpus=1,
    )
    assert not any(m in ("critic", "reward model") for m, _ in parts(grpo))  # no critic, a grader instead
    with pytest.raises(pl.PlanError, match="reward_model"):
        pl.plan_step(pl.Workload(method="ppo"), SHAPE, None, pl.Setup(), gpus=1)


def test_the_plan_is_the_fastest_choice_that_fits() -> None:
    w = pl.Workload(method="sft", seq_len=512, micro_batch=8)
    roomy = pl.plan(w, SHAPE, None, gpus=8, gpu_bytes=200 * pl.GiB)
    assert roomy.best is not None and roomy.best.choice == pl.Setup()  # plain data parallel: nothing given up
    for gib in (16, 8, 4, 2):
        p = pl.plan(w, SHAPE, None, gpus=8, gpu_bytes=gib * pl.GiB)
        assert p.best is not None and p.best.fits, gib
        every = pl.choices("sft", 8, micro_batch=8)
        fitting = [c for c in every if pl.plan_step(w, SHAPE, None, c, gpus=8, gpu_bytes=gib * pl.GiB).fits]
        assert p.best.choice.speed() == max(c.speed() for c in fitting)
        assert p.best.choice != pl.Setup()  # it had to give something up
    none = pl.plan(w, SHAPE, None, gpus=1, gpu_bytes=1 * pl.GiB)
    assert none.best is None and none.smallest.total_bytes > pl.GiB
    assert pl.smallest_fit(w, SHAPE, None, gpu_type="V100-32G", gpus=1).startswith("2× V100-32G")
    kept = pl.plan(
        w, SHAPE, None, gpus=8, gpu_bytes=16 * pl.GiB, allowed=pl.allowed_by({"zero_stage": 3}, "sft")
    )
    assert kept.best is not None and kept.best.choice.zero_stage == 3  # what the caller fixed is kept


def test_step_options_round_trip_through_the_step_configs() -> None:
    import argparse

    from rlhf_engine.config.args import dataclass_from_args
    from rlhf_engine.config.ppo import PPOConfig
    from rlhf_engine.config.train import SFTConfig

    def build(cls: type, **values: object) -> object:
        return dataclass_from_args(cls, argparse.Namespace(), file_values=values)

    c = pl.Setup(zero_stage=3, offload=True, lora_dim=16, gradient_checkpointing=True, offload_frozen=True)
    sft = build(SFTConfig, model_name_or_path="m", **pl.step_options(c, "sft"))
    assert pl.choice_of(sft, "sft") == pl.replace(c, offload_frozen=False)
    ppo: Any = build(
        PPOConfig, actor_model_name_or_path="a", critic_model_name_or_path="c", **pl.step_options(c, "ppo")
    )
    assert pl.choice_of(ppo, "ppo") == c and ppo.critic.lora_dim == 0 and ppo.critic.zero_stage == 3
    assert pl.as_flags({"zero_stage": 3, "offload": False}) == "--zero-stage 3 --no-offload"
    split = pl.step_options(
        pl.Setup(split=4), "sft", pl.Workload(method="sft", micro_batch=16, accumulation=8)
    )
    assert split["per_device_train_batch_size"] == 4 and split["gradient_accumulation_steps"] == 32
    fixed = pl.allowed_by({"per_device_train_batch_size": 16}, "sft")
    assert not fixed(pl.Setup(split=2)) and fixed(pl.Setup(zero_stage=3))  # batches the caller set stay


def test_sizes_come_from_the_safetensors_headers(base_model: Path, smollm2: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model))
    shape = pl.load_shape(str(base_model), name="actor")
    assert shape.params == sum(p.numel() for p in model.parameters())  # (tied embeddings counted once)
    assert (shape.layers, shape.hidden, shape.vocab) == (
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.config.vocab_size,
    )
    smol = pl.load_shape(str(smollm2), name="actor")  # a real Llama-family checkpoint: GQA, gated MLP, tied
    assert smol.params == 134_515_008 and smol.gated and (smol.heads, smol.kv_heads) == (9, 3)
    config = json.loads((smollm2 / "config.json").read_text())
    assert pl.Shape.from_config(config).params == smol.params  # the config's arithmetic agrees with the file


def rlhf(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rlhf_engine.cli", "plan", *args], capture_output=True, text=True, timeout=120
    )


def test_rlhf_plan_prints_the_arithmetic_and_says_when_nothing_fits() -> None:
    out = rlhf(
        "--actor-params", "13e9", "--reward-params", "350e6", "--gpu-type", "A100-80G", "--num-gpus", "8"
    )
    assert out.returncode == 0, out.stderr
    assert "step 3: ppo on 8× A100-80G: fits with" in out.stdout and "KV cache (generation)" in out.stdout
    assert "activations:" in out.stdout and "options: --actor-zero-stage" in out.stdout
    plan = json.loads(
        rlhf(
            "--actor-params",
            "13e9",
            "--reward-params",
            "350e6",
            "--gpu-memory-gb",
            "80",
            "--num-gpus",
            "8",
            "--json",
        ).stdout
    )
    assert set(plan["steps"]) == {"1", "2", "3"} and all(s["fits"] for s in plan["steps"].values())
    assert plan["steps"]["3"]["plan"]["total_bytes"] <= 80 * pl.GiB
    big = rlhf(
        "--actor-params", "175e9", "--reward-params", "350e6", "--gpu-type", "V100-32G", "--method", "dpo"
    )
    assert big.returncode == 3 and "DOES NOT FIT" in big.stdout
    for args, says in (
        (["--actor-params", "1e9"], "gpu_memory_gb"),
        (["--actor-params", "1e9", "--gpu-type", "K80"], "gpu_type: 'K80' is not known"),
        (["--actor-params", "1e9", "--gpu-memory-gb", "80"], "reward_model: method rlhf"),
        (["--actor-model", "/no/such", "--method", "sft", "--gpu-memory-gb", "80"], "--actor-params"),
    ):
        bad = rlhf(*args)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, (
            args,
            bad.stderr,
        )


def test_deepspeed_chats_tables_on_paper_and_in_the_readme() -> None:
    rows = pl.dschat_table()
    known = [r for r in rows if r["published"] is not None]
    assert sum(r["published"] == r["dschat_settings"] for r in known) >= len(known) - 1
    assert pl.dschat_markdown() in (ROOT / "docs" / "planning.md").read_text()  # moved from README.md


def test_zero_buckets_are_capped_at_the_models_size() -> None:
    """DeepSpeed allocates its reduce bucket at 5e8 elements whatever the model (1.9 GiB of fp32 per
    process, measured as 1.9 of a 25.8M model's 2.4 GiB peak at ZeRO-2); our configs cap it."""
    import torch

    from rlhf_engine.runtime.deepspeed_setup import size_buckets

    model = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.Linear(50, 10))
    model[1].requires_grad_(False)
    for stage, expect in (
        (2, {"reduce_bucket_size": 5050, "allgather_bucket_size": 5050}),
        (3, {"reduce_bucket_size": 5050, "stage3_prefetch_bucket_size": 5560}),
    ):
        config = {"zero_optimization": {"stage": stage}}
        size_buckets(config, model)
        assert expect.items() <= config["zero_optimization"].items(), config
    plain = {"zero_optimization": {"stage": 0}}
    size_buckets(plain, model)
    assert plain == {"zero_optimization": {"stage": 0}}
    chosen = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 7}}
    size_buckets(chosen, model)
    assert chosen["zero_optimization"]["reduce_bucket_size"] == 7  # an explicit size stays


def test_config_auto_plans_for_this_machine_and_keeps_the_flags_given(
    base_model: Path, tmp_path: Path
) -> None:
    from tests.runs import rlhf as run_rlhf

    done = run_rlhf(
        "sft",
        "--model",
        base_model,
        "--output-dir",
        tmp_path,
        "--config",
        "auto",
        "--max-steps",
        2,
        "--zero-stage",
        2,
        "--eval-max-rows",
        8,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--config auto on the CPU's" in done.stderr and "ZeRO-2" in done.stderr  # the flag given is kept
    summary = json.loads((tmp_path / "step1_sft" / "summary.json").read_text())
    assert summary["global_steps"] == 2 and summary["peak_memory_mib"] > 0


def test_rlhf_train_config_auto_fills_each_steps_section(base_model: Path, tmp_path: Path) -> None:
    import argparse

    from rlhf_engine.cli import _auto_pipeline
    from rlhf_engine.config.args import dataclass_from_args
    from rlhf_engine.config.pipeline import PipelineConfig

    cfg = dataclass_from_args(
        PipelineConfig,
        argparse.Namespace(),
        file_values={
            "actor_model": str(base_model),
            "reward_model": str(base_model),
            "output_dir": str(tmp_path),
            "actor_zero_stage": 3,
        },
    )
    sections: dict[str, dict[str, object]] = {"sft": {}, "reward": {}, "ppo": {}}
    _auto_pipeline(cfg, sections)
    assert (
        sections["sft"]["offload"] is False and "zero_stage" not in sections["sft"]
    )  # ZeRO-3 was given: kept
    assert sections["reward"]["zero_stage"] == 0
    assert "actor_zero_stage" not in sections["ppo"] and sections["ppo"]["actor_offload"] is False
