"""GPU smoke test of all three steps at DeepSpeed-Chat's scale (prepared for one CUDA GPU; < 8 min on H100).

Three families with random weights (from config; no download), the bundled data, a few steps of each
step: an OPT-1.3B-shaped actor with an OPT-350M-shaped reward model (step 3 twice: our generation
path and DeepSpeed's HybridEngine with kernel injection), a Llama-3.2-1B-shaped and a
Qwen2.5-1.5B-shaped actor (rotary, grouped-query attention, 128k/152k vocabularies) each with a
350M reward model of its family (`--arch` picks families). Reports, per step 3 variant, effective TFLOPs by
DeepSpeed-Chat's formula (below), generation tokens/s and peak GPU memory, and for each step
`torch.cuda.max_memory_allocated` beside the memory planner's prediction (`rlhf plan`); writes
bench/results/gpu_smoke-*.json.

DeepSpeed-Chat's formula (dschat/utils/perf.py, after Megatron-LM), per PPO step:
    flops(model, factor) = 24·factor·B·S·L·H² · (1 + S/(6H) + V/(16·L·H))
    train TFLOPs = (flops(actor, 3 or 4 with grad. ckpt) + flops(critic, 3 or 4)) / train_seconds / 1e12
    generation TFLOPs = flops(actor, 1) / generation_seconds / 1e12
  B = experiences per step, S = prompt + answer length, L layers, H hidden size, V vocabulary.

Run on a machine with a GPU (this one has none; the lent machine has torch and transformers but no
deepspeed, so carry a wheel built here):
    pip wheel --no-deps deepspeed==0.19.8 -w shared/wheels        # here
    pip install shared/wheels/deepspeed-*.whl && pip install --no-deps -e . && python bench/gpu_smoke.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_result  # (bench/ is on the path when a script runs from it)

ROOT = Path(__file__).resolve().parents[1]
PROMPT_LEN, ANSWER_LEN, BATCH = 256, 256, 8


def dschat_flops(cfg: Any, factor: float, batch: int, seq: float) -> float:
    L, H, V = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size
    return 24 * factor * batch * seq * L * H**2 * (1.0 + seq / (6.0 * H) + V / (16.0 * L * H))


ARCHS = ("opt", "llama", "qwen2")


def shapes(arch: str, ids: dict[str, Any]) -> dict[str, Any]:
    """The actor and reward-model configs of one family, at the sizes people run: OPT-1.3B + OPT-350M
    (DeepSpeed-Chat's example), Llama-3.2-1B-shaped + a 350M Llama, Qwen2.5-1.5B-shaped + a 350M Qwen2."""
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    if arch == "opt":
        return {
            "actor": OPTConfig(
                hidden_size=2048,
                num_hidden_layers=24,
                num_attention_heads=32,
                ffn_dim=8192,
                word_embed_proj_dim=2048,
                vocab_size=50272,
                max_position_embeddings=2048,
                **ids,
            ),
            "reward": OPTConfig(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                ffn_dim=4096,
                word_embed_proj_dim=512,
                vocab_size=50272,
                max_position_embeddings=2048,
                **ids,
            ),
        }
    if arch == "llama":
        return {
            "actor": LlamaConfig(
                hidden_size=2048,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=8,
                intermediate_size=8192,
                vocab_size=128256,
                max_position_embeddings=4096,
                tie_word_embeddings=True,
                **ids,
            ),
            "reward": LlamaConfig(
                hidden_size=1024,
                num_hidden_layers=20,
                num_attention_heads=16,
                num_key_value_heads=4,
                intermediate_size=2816,
                vocab_size=128256,
                max_position_embeddings=4096,
                tie_word_embeddings=True,
                **ids,
            ),
        }
    if arch == "qwen2":
        return {
            "actor": Qwen2Config(
                hidden_size=1536,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                intermediate_size=8960,
                vocab_size=151936,
                max_position_embeddings=4096,
                tie_word_embeddings=True,
                use_sliding_window=False,
                **ids,
            ),
            "reward": Qwen2Config(
                hidden_size=1024,
                num_hidden_layers=20,
                num_attention_heads=16,
                num_key_value_heads=4,
                intermediate_size=2816,
                vocab_size=151936,
                max_position_embeddings=4096,
                tie_word_embeddings=True,
                use_sliding_window=False,
                **ids,
            ),
        }
    raise ValueError(f"arch {arch!r} is not one of {ARCHS}")


def make_models(root: Path, arch: str) -> tuple[Path, Path]:
    """Random-weight actor and reward model of `arch` with the bundled tokenizer (vocab padded)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_engine.models.tokenizer import bundled_tokenizer_dir

    tok_dir = bundled_tokenizer_dir()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    out = []
    for name, cfg in shapes(arch, ids).items():
        d = root / f"{arch}_{name}"
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(str(d), safe_serialization=True)
        for f in tok_dir.iterdir():
            shutil.copy2(f, d / f.name)
        out.append(d)
    return out[0], out[1]


def rlhf(*args: object, log: Path) -> float:
    started = time.monotonic()
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, "-m", "rlhf_engine.cli", *map(str, args)], stdout=f, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise RuntimeError(f"rlhf {args[0]} failed; see {log}")
    return time.monotonic() - started


def chat_check(model: Path) -> dict[str, Any]:
    """The chat generator on CUDA: each backend (kernel injection included) — greedy tokens against the
    transformers backend, and 8-stream decode tokens/s."""
    from rlhf_engine.chat import ChatGenerator, SamplingParams

    questions = [[{"role": "user", "content": q}] for q in ("What is a dog?", "Where does the owl live?")]
    out: dict[str, Any] = {}
    reference: list[list[int]] = []
    for name, opts in (
        ("transformers", {"backend": "transformers"}),
        ("deepspeed", {"backend": "deepspeed"}),
        ("deepspeed_inject", {"backend": "deepspeed", "kernel_inject": True}),
    ):
        try:
            with ChatGenerator.load(str(model), dtype="fp16", **opts) as engine:
                greedy = [
                    engine.generate(q, SamplingParams(temperature=0, max_new_tokens=32)).choices[0].token_ids
                    for q in questions
                ]
                reference = reference or greedy
                started = time.monotonic()
                handles = [
                    engine.submit(
                        questions[i % 2], SamplingParams(seed=i, max_new_tokens=128, ignore_eos=True)
                    )
                    for i in range(8)
                ]
                tokens = sum(h.result().usage.completion_tokens for h in handles)
                out[name] = {
                    "greedy_equal": greedy == reference,
                    "tokens_per_s": tokens / (time.monotonic() - started),
                }
        except Exception as e:  # a smoke test reports what broke and goes on
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    return out


def run_arch(arch: str, work: Path, *, hybrid: bool) -> dict[str, Any]:
    """SFT, reward model and PPO (ours; and DeepSpeed's HybridEngine where asked) for one family."""
    from transformers import AutoConfig

    actor, reward = make_models(work, arch)
    run = work / f"run_{arch}"
    common = ["--max-seq-len", PROMPT_LEN + ANSWER_LEN, "--checkpoint-interval", 0, "--eval-max-rows", 64]
    seconds = {
        "sft": rlhf(
            "sft",
            "--model",
            actor,
            "--output-dir",
            run,
            "--max-steps",
            5,
            "--per-device-train-batch-size",
            BATCH,
            "--gradient-accumulation-steps",
            1,
            "--zero-stage",
            2,
            "--dtype",
            "bf16",
            *common,
            log=work / f"{arch}_sft.log",
        ),
        "reward": rlhf(
            "reward",
            "--model",
            reward,
            "--output-dir",
            run,
            "--max-steps",
            5,
            "--per-device-train-batch-size",
            BATCH,
            "--gradient-accumulation-steps",
            1,
            "--zero-stage",
            2,
            "--dtype",
            "bf16",
            *common,
            log=work / f"{arch}_reward.log",
        ),
    }
    actor_cfg = AutoConfig.from_pretrained(str(actor))
    critic_cfg = AutoConfig.from_pretrained(str(reward))
    results: dict[str, Any] = {
        "seconds": seconds,
        "actor_params_b": _params(actor_cfg) / 1e9,
        "reward_params_b": _params(critic_cfg) / 1e9,
    }
    variants: list[tuple[str, list[str]]] = [("ours", [])] + (
        [("deepspeed_hybrid_engine", ["--enable-hybrid-engine"])] if hybrid else []
    )
    for variant, extra in variants:
        out = work / f"ppo_{arch}_{variant}"
        out.mkdir()
        for step in ("step1_sft", "step2_reward"):
            (out / step).symlink_to(run / step)
        try:
            rlhf(
                "ppo",
                "--actor-model",
                run / "step1_sft",
                "--critic-model",
                run / "step2_reward",
                "--output-dir",
                out,
                "--max-steps",
                4,
                "--per-device-generation-batch-size",
                BATCH,
                "--per-device-training-batch-size",
                BATCH,
                "--max-prompt-len",
                PROMPT_LEN,
                "--max-answer-len",
                ANSWER_LEN,
                "--actor-zero-stage",
                2,
                "--critic-zero-stage",
                2,
                "--actor-dtype",
                "bf16",
                "--critic-dtype",
                "bf16",
                "--rollouts-per-step",
                0,
                "--checkpoint-interval",
                0,
                "--eval-max-rows",
                16,
                *extra,
                log=work / f"ppo_{arch}_{variant}.log",
            )
        except RuntimeError as e:
            results[variant] = {"error": str(e)}
            continue
        metrics = [json.loads(x) for x in (out / "step3_rlhf" / "metrics.jsonl").read_text().splitlines()][1:]
        gen_s = sum(m["gen_s"] for m in metrics) / len(metrics)
        train_s = sum(m["train_s"] for m in metrics) / len(metrics)
        seq = PROMPT_LEN + ANSWER_LEN
        results[variant] = {
            "gen_tflops": dschat_flops(actor_cfg, 1, BATCH, seq) / gen_s / 1e12,
            "train_tflops": (dschat_flops(actor_cfg, 3, BATCH, seq) + dschat_flops(critic_cfg, 3, BATCH, seq))
            / train_s
            / 1e12,
            "gen_tokens_per_s": sum(m["tokens_per_s"] for m in metrics) / len(metrics),
            "samples_per_s": sum(m["samples_per_s"] for m in metrics) / len(metrics),
            "gen_s": gen_s,
            "train_s": train_s,
            "peak_memory_gib": max(m.get("peak_memory_gib", 0.0) for m in metrics),
        }
        # DeepSpeed-Chat's S is the configured maximum; random-weight answers end far earlier (≈14 of 256
        # tokens on an H200), so the same formula at the measured length says what was really computed
        real = PROMPT_LEN + sum(m.get("answer_len", ANSWER_LEN) for m in metrics) / len(metrics)
        results[variant] |= {
            "mean_seq_len": real,
            "gen_tflops_measured_len": dschat_flops(actor_cfg, 1, BATCH, real) / gen_s / 1e12,
            "train_tflops_measured_len": (
                dschat_flops(actor_cfg, 3, BATCH, real) + dschat_flops(critic_cfg, 3, BATCH, real)
            )
            / train_s
            / 1e12,
        }
    results["memory"] = memory_vs_plan(actor, reward, run, work / f"ppo_{arch}_ours")
    results["chat"] = chat_check(run / "step1_sft")
    return results


def memory_vs_plan(actor: Path, reward: Path, run: Path, ppo_out: Path) -> dict[str, Any]:
    """Each step's measured peak (`torch.cuda.max_memory_allocated`, from its summary) beside the memory
    planner's prediction for the same options on this GPU."""
    import torch

    from rlhf_engine import planner as pl

    gpu = torch.cuda.get_device_properties(0).total_memory
    a, r = pl.load_shape(str(actor), name="actor"), pl.load_shape(str(reward), name="reward model")
    z2 = pl.Setup(zero_stage=2)
    cases = {
        "sft": (
            pl.Workload(method="sft", seq_len=PROMPT_LEN + ANSWER_LEN, micro_batch=BATCH),
            run / "step1_sft",
        ),
        "reward": (
            pl.Workload(method="reward", seq_len=PROMPT_LEN + ANSWER_LEN, micro_batch=BATCH),
            run / "step2_reward",
        ),
        "ppo": (
            pl.Workload(
                method="ppo",
                prompt_len=PROMPT_LEN,
                answer_len=ANSWER_LEN,
                micro_batch=BATCH,
                generation_batch=BATCH,
            ),
            ppo_out / "step3_rlhf",
        ),
    }
    out: dict[str, Any] = {}
    for name, (w, step_dir) in cases.items():
        plan = pl.plan_step(w, a, r, z2, gpus=1, gpu_bytes=gpu)
        summary = (
            json.loads((step_dir / "summary.json").read_text())
            if (step_dir / "summary.json").is_file()
            else {}
        )
        measured = summary.get("peak_memory_mib")
        planned = (
            plan.static_bytes + plan.phase_bytes[plan.peak_phase]
        ) / 2**20  # tensors: no margin, no context
        out[name] = {
            "measured_mib": measured,
            "source": summary.get("peak_memory_source"),
            "planned_mib": round(planned),
            "planned_with_margin_mib": round(plan.total_bytes / 2**20),
            "peak_phase": plan.peak_phase,
            "error": round(planned / measured - 1, 4) if measured else None,
        }
    return out


def _params(cfg: Any) -> float:
    """Parameters of a decoder from its config (embeddings once when tied)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return float(sum(p.numel() for p in model.parameters()))


def main() -> int:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        nargs="+",
        choices=ARCHS,
        default=list(ARCHS),
        help="families to run (all by default: OPT with the HybridEngine variant, Llama, Qwen2)",
    )
    ns = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; run it on a GPU machine (see the docstring)")
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke."))
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    for arch in ns.arch:
        try:
            results[arch] = run_arch(arch, work, hybrid=arch == "opt")
        except Exception as e:  # a smoke test reports what broke and goes on
            results[arch] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({arch: results[arch]}, indent=2), flush=True)
    write_result("gpu_smoke", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
