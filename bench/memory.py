"""The memory planner against measured peak memory on this machine (`make bench-memory`).

Each row runs one step for a few optimizer steps in a fresh process, under torch's profiler with
`profile_memory=True`: the measured peak is the largest sum of live tensor bytes that torch's CPU
allocator handed out (every allocation and free, from before the models load to the end of the step) —
tensors only, not the interpreter, libraries or allocator slack. The prediction is the planner's for the
same step options on one process in fp32: the resident models plus the largest phase, before the
fragmentation margin and GPU overhead it adds on a GPU (and with what it would offload to host memory,
which on the CPU is the same memory). Writes bench/results/memory.json and a table.

    python bench/memory.py [--rows tiny|smollm2|all] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

TINY = {"max_seq_len": 128, "max_prompt_len": 64, "eval_max_rows": 8}
SMOL = {"max_seq_len": 96, "max_prompt_len": 64, "eval_max_rows": 8}
# (label, command, actor, reward model, step options)
ROWS: list[tuple[str, str, str, str, dict[str, Any]]] = [
    ("SFT, ZeRO-0", "sft", "tiny-m", "", {"zero_stage": 0}),
    ("SFT, ZeRO-2", "sft", "tiny-m", "", {"zero_stage": 2}),
    ("SFT, ZeRO-3", "sft", "tiny-m", "", {"zero_stage": 3}),
    ("SFT, ZeRO-2 + offload", "sft", "tiny-m", "", {"zero_stage": 2, "offload": True}),
    ("SFT, LoRA 16", "sft", "tiny-m", "", {"lora_dim": 16, "only_optimize_lora": True}),
    ("SFT, checkpointing", "sft", "tiny-m", "", {"gradient_checkpointing": True}),
    ("RM, ZeRO-0", "reward", "", "tiny-m", {}),
    ("DPO, ZeRO-0", "dpo", "tiny-m", "", {}),
    ("PPO + EMA, ZeRO-0", "ppo", "tiny-m", "tiny-s", {"enable_ema": True}),
    ("GRPO (grader), ZeRO-0", "ppo", "tiny-m", "", {"algorithm": "grpo", "samples_per_prompt": 4}),
    ("SmolLM2 SFT, ZeRO-0", "sft", "smollm2", "", {}),
    ("SmolLM2 SFT, LoRA 16", "sft", "smollm2", "", {"lora_dim": 16, "only_optimize_lora": True}),
    ("SmolLM2 SFT, ZeRO-3", "sft", "smollm2", "", {"zero_stage": 3}),
    ("SmolLM2 DPO, LoRA 16", "dpo", "smollm2", "", {"lora_dim": 16, "only_optimize_lora": True}),
    (
        "SmolLM2 PPO, LoRA 16",
        "ppo",
        "smollm2",
        "smollm2-rm",
        {"actor_lora_dim": 16, "actor_only_optimize_lora": True},
    ),
]
GRADER = {
    "type": "string_check",
    "name": "any",
    "input": "{{sample.output_text}}",
    "reference": "x",
    "operation": "ne",
}


def model_dir(name: str) -> str:
    from rlhf_engine.models.gguf import build_smollm2
    from rlhf_engine.models.tiny import build_tiny

    if name == "smollm2":
        return str(build_smollm2())
    if name == "smollm2-rm":
        return str(build_tiny("llama", "xs", tokenizer_from="smollm2"))
    arch_size = {"tiny-m": ("opt", "m"), "tiny-s": ("opt", "s")}[name]
    return str(build_tiny(*arch_size))  # type: ignore[arg-type]


def options(
    command: str, actor: str, reward: str, extra: dict[str, Any], out: Path, steps: int
) -> dict[str, Any]:
    data = dict(SMOL if "smollm2" in (actor + reward) else TINY)
    eval_rows = data.pop("eval_max_rows")
    common = {
        **data,
        "output_dir": str(out),
        "max_steps": steps,
        "checkpoint_interval": 0,
        "eval_max_rows": eval_rows,
        "seed": 1,
    }
    if command in ("sft", "dpo"):
        return (
            common
            | {
                "model_name_or_path": model_dir(actor),
                "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 4,
                "gradient_accumulation_steps": 1,
            }
            | extra
        )
    if command == "reward":
        return (
            common
            | {
                "model_name_or_path": model_dir(reward),
                "per_device_train_batch_size": 4,
                "per_device_eval_batch_size": 4,
                "gradient_accumulation_steps": 1,
            }
            | extra
        )
    ppo = common | {
        "actor_model_name_or_path": model_dir(actor),
        "per_device_generation_batch_size": 4,
        "per_device_training_batch_size": 4,
        "max_answer_len": 16,
    }
    if reward:
        ppo["critic_model_name_or_path"] = model_dir(reward)
    else:
        ppo["grader"] = json.dumps(GRADER)
        ppo["per_device_generation_batch_size"] = 2
        ppo["per_device_training_batch_size"] = 8
    return ppo | extra


def measure(row: int, steps: int) -> dict[str, Any]:
    """In this (fresh) process: run the row's step under the profiler; the planner's prediction beside it."""
    import argparse as ap
    import importlib

    import torch
    from torch.profiler import ProfilerActivity, profile

    from rlhf_engine import planner as pl
    from rlhf_engine.cli import STEPS, _step_config_class
    from rlhf_engine.config.args import dataclass_from_args

    torch.set_num_threads(2)
    label, command, actor, reward, extra = ROWS[row]
    with tempfile.TemporaryDirectory() as tmp:
        values = options(command, actor, reward, extra, Path(tmp), steps)
        config: Any = dataclass_from_args(_step_config_class(command), ap.Namespace(), file_values=values)
        stage = importlib.import_module(STEPS[command][0])
        started = time.monotonic()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            stage.run(config)
        seconds = time.monotonic() - started
    live = peak = 0
    for e in sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    ):
        live += e.nbytes()
        peak = max(peak, live)
    method = config.algorithm if command == "ppo" else command
    a_path = values.get("model_name_or_path") or values.get("actor_model_name_or_path")
    assert a_path is not None, values  # every step's options name its (actor) model
    a = pl.load_shape(a_path, name="actor")
    r_path = values.get("critic_model_name_or_path")
    r = pl.load_shape(r_path, name="reward model") if r_path else None
    if command == "reward":
        a, r = r or a, a
    plan = pl.plan_step(
        pl.workload_of(config, method, dtype_bytes=4), a, r, pl.choice_of(config, method), gpus=1
    )
    # one process on the CPU: what the plan would offload to host memory lives in the same memory
    predicted = plan.static_bytes + plan.phase_bytes[plan.peak_phase] + plan.host_bytes_per_node
    return {
        "row": label,
        "command": command,
        "measured_bytes": peak,
        "predicted_bytes": round(predicted),
        "error": round(predicted / peak - 1, 4),
        "peak_phase": plan.peak_phase,
        "seconds": round(seconds, 1),
        "actor_params": a.params,
        "configuration": plan.choice.describe(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", choices=["tiny", "smollm2", "all"], default="all")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.one is not None:
        print("RESULT " + json.dumps(measure(ns.one, ns.steps)), flush=True)
        return 0
    picked = [
        i
        for i, r in enumerate(ROWS)
        if ns.rows == "all" or (ns.rows == "smollm2") == ("smollm2" in r[2] + r[3])
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="2",
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
    )
    results = []
    for i in picked:
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(i), "--steps", str(ns.steps)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{ROWS[i][0]}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(line[7:]))
        r = results[-1]
        print(
            f"{r['row']:<26} measured {r['measured_bytes'] / 2**20:8.1f} MiB  predicted "
            f"{r['predicted_bytes'] / 2**20:8.1f} MiB  {100 * r['error']:+6.1f}%  "
            f"({r['peak_phase']}, {r['seconds']} s)",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(
        json.dumps({"rows": results, "machine": os.uname().nodename}, indent=2)
    )
    worst = max(abs(r["error"]) for r in results)
    print(f"\nworst error {100 * worst:.1f}% over {len(results)} rows (target: within 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
