"""Step 3 on one GPU at DeepSpeed-Chat's scale, against its own figure (`python bench/gpu_bench.py`).

An OPT-1.3B-shaped actor with an OPT-350M-shaped critic and reward model (random weights from config: no
download), DeepSpeed-Chat's single-GPU 1.3B settings — 256-token prompts, answers forced to 256 tokens so
the work is what its formula counts, 16 prompts per generation and 16 experiences per micro-batch, bf16,
ZeRO-0 — for `--steps` PPO steps after one warm-up step, on our generation path. Reports:

- effective TFLOPs per GPU by DeepSpeed-Chat's formula (dschat/utils/perf.py, after Megatron-LM):
      flops(model, f) = 24·f·B·S·L·H² · (1 + S/(6H) + V/(16·L·H)),  f = 3 (4 with gradient checkpointing)
      e2e TFLOPs = (flops(actor, f) + flops(critic, f) + flops(actor, 1)) / step seconds / 1e12
  (B experiences per step, S = prompt + answer, L layers, H hidden, V vocabulary);
- generation tokens/s, the generation / scoring / training / other split of a step;
- peak memory (`torch.cuda.max_memory_allocated`) beside the memory planner's prediction (`rlhf plan`);
- the GPU's measured bf16 peak (a large matmul, timed in the same run), and the e2e TFLOPs as a share of it.

DeepSpeed-Chat's figure: 43.4 TFLOPs/GPU for 1.3B on an A100 (≈14% of its 312 TFLOPs bf16 peak). The target
here: ≥ 35% of the measured peak of the GPU it runs on. Writes bench/results/gpu_bench-*.json. ≤ 8 minutes
on an H100-class GPU. Prepared on a machine without a GPU (unrun there): on the lent machine, carry a
DeepSpeed wheel built here (`pip wheel --no-deps deepspeed==0.19.8 -w shared/wheels`), then
    pip install shared/wheels/deepspeed-*.whl && pip install --no-deps -e . && python bench/gpu_bench.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_result  # (bench/ is on the path when a script runs from it)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
PROMPT_LEN, ANSWER_LEN, BATCH = 256, 256, 16


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    """bf16 TFLOPs of n×n×n matmuls, the best of three timings: the peak this GPU reaches in practice."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
    return best


def run(steps: int, checkpointing: bool) -> dict[str, Any]:
    import torch
    from gpu_smoke import dschat_flops, make_models
    from transformers import AutoConfig, AutoTokenizer

    from rlhf_engine import PPOConfig, PPOTrainer, RLHFEngine
    from rlhf_engine import planner as pl
    from rlhf_engine.data.collate import collate_prompts
    from rlhf_engine.data.prepare import prepare_step

    work = Path(tempfile.mkdtemp(prefix="gpu_bench."))
    actor, critic = make_models(work, "opt")
    opts = {"zero_stage": 0, "dropout": 0.0, "dtype": "bf16", "gradient_checkpointing": checkpointing}
    args = PPOConfig(
        actor_model_name_or_path=str(actor),
        critic_model_name_or_path=str(critic),
        per_device_generation_batch_size=BATCH,
        per_device_training_batch_size=BATCH,
        generation_batches=1,
        max_answer_len=ANSWER_LEN,
        num_warmup_steps=0,
        actor=opts,
        critic=dict(opts),
    )
    args.data.max_prompt_len = PROMPT_LEN
    tok = AutoTokenizer.from_pretrained(str(actor))
    prompts = prepare_step(args.data, 3, tok).train
    torch.cuda.reset_peak_memory_stats()
    engine = RLHFEngine(
        actor_model_name_or_path=str(actor),
        critic_model_name_or_path=str(critic),
        tokenizer=tok,
        num_total_iters=steps + 1,
        args=args,
    )
    trainer = PPOTrainer(engine=engine, args=args)
    trainer.generate_kwargs = {"min_new_tokens": ANSWER_LEN}  # the work DeepSpeed-Chat's formula counts
    rows = []
    for step in range(steps + 1):  # step 0 warms up
        batch = collate_prompts(
            [prompts.row((step * BATCH + i) % len(prompts)) for i in range(BATCH)], tok.pad_token_id
        )
        torch.cuda.synchronize()
        t0 = time.monotonic()
        exp = trainer.generate_experience(batch)
        torch.cuda.synchronize()
        t1 = time.monotonic()
        trainer.train_rlhf(exp)
        torch.cuda.synchronize()
        t2 = time.monotonic()
        if step:
            rows.append(
                {
                    "step_s": t2 - t0,
                    "gen_s": exp.gen_seconds,
                    "score_s": exp.score_seconds,
                    "train_s": t2 - t1,
                    "other_s": (t1 - t0) - exp.gen_seconds - exp.score_seconds,
                    "gen_tokens": int(exp.answer_lengths.sum()),
                    "seq_len": PROMPT_LEN + float(exp.answer_lengths.float().mean()),
                }
            )
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    a_cfg, c_cfg = AutoConfig.from_pretrained(str(actor)), AutoConfig.from_pretrained(str(critic))
    f = 4 if checkpointing else 3
    seq = PROMPT_LEN + ANSWER_LEN
    flops = (
        dschat_flops(a_cfg, f, BATCH, seq)
        + dschat_flops(c_cfg, f, BATCH, seq)
        + dschat_flops(a_cfg, 1, BATCH, seq)
    )
    peak_bytes = torch.cuda.max_memory_allocated()
    w = pl.Workload(
        method="ppo", prompt_len=PROMPT_LEN, answer_len=ANSWER_LEN, micro_batch=BATCH, generation_batch=BATCH
    )
    plan = pl.plan_step(
        w,
        pl.load_shape(str(actor), name="actor"),
        pl.load_shape(str(critic), name="reward model"),
        pl.Setup(gradient_checkpointing=checkpointing),
        gpus=1,
        gpu_bytes=torch.cuda.get_device_properties(0).total_memory,
    )
    planned = plan.static_bytes + plan.phase_bytes[plan.peak_phase]
    return {
        "checkpointing": checkpointing,
        "steps": rows,
        "mean": mean,
        "e2e_tflops": flops / mean["step_s"] / 1e12,
        "gen_tokens_per_s": mean["gen_tokens"] / mean["gen_s"],
        "mean_seq_len": mean["seq_len"],
        "peak_memory_gib": peak_bytes / 2**30,
        "planned_gib": planned / 2**30,
        "planned_with_margin_gib": plan.total_bytes / 2**30,
        "plan_error": planned / peak_bytes - 1,
    }


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument(
        "--checkpointing", action="store_true", help="gradient checkpointing (DeepSpeed-Chat's f = 4)"
    )
    ns = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; run it on a GPU machine (see the docstring)")
        return 2
    peak = matmul_peak_tflops()
    result = run(ns.steps, ns.checkpointing)
    result |= {
        "device": torch.cuda.get_device_name(0),
        "bf16_peak_tflops": peak,
        "share_of_peak": result["e2e_tflops"] / peak,
        "target_share": 0.35,
        "dschat_a100_tflops": 43.4,
        "dschat_a100_share": 43.4 / 312,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))
    print(
        f"\n{result['device']}: {result['e2e_tflops']:.1f} TFLOPs/GPU e2e = "
        f"{100 * result['share_of_peak']:.1f}% of the measured bf16 peak {peak:.0f} "
        f"(target ≥ 35%; DeepSpeed-Chat on A100: 43.4 = 14%); generation "
        f"{result['gen_tokens_per_s']:.0f} tokens/s; peak memory {result['peak_memory_gib']:.1f} GiB, "
        f"planned {result['planned_gib']:.1f} ({100 * result['plan_error']:+.1f}%)"
    )
    write_result("gpu_bench", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
