"""GRPO against the peer users pick: our `rlhf ppo --algorithm grpo --grader` vs TRL's `GRPOTrainer`,
and our GRPO vs our PPO — same model, prompts, group size, answer length and reward, interleaved.

    make bench-trl            (creates .venv-bench-trl: TRL pinned beside the product's packages, not in them)
    .venv-bench-trl/bin/python bench/grpo_trl.py [--models toy smollm2] [--rounds 2] [--steps 6]

Both sides: fp32 on CPU, the same torch threads, 4 prompts × 4 answers = 16 answers per optimizer
step, answers of at most 32 sampled tokens (temperature 1, no top-k/top-p), the clipped loss with ε 0.2,
KL to a frozen reference in the loss (β 0.04: TRL's `beta`, our `--kl-in loss --kl-ctl 0.04`), one
policy update per batch. Prompts: `bundled:questions`, rendered by the model's chat template. Reward:
1 when the answer names the subject asked about — our `string_check` grader
(`{{item.subject}}` ilike), TRL's Python reward function doing the same test on the same field.
Our PPO: 16 prompts × 1 answer with a critic (from the same model, a fresh value head), the same grader.

Each run is its own process (so its peak RSS is its own), the sides alternate (ours, TRL, PPO, ours, …)
so a change in the machine's load hits all of them. samples/s = answers per second of steady-state
steps (the first step of each run is dropped: first-call allocation, warm-up). Where the time goes:
ours from its per-step metrics (generation, scoring = reference/reward passes and the grader,
training); TRL from a timer around `generate` and its reward function, the rest being its
log-prob passes and the update (TRL's gradient checkpointing is turned off, as ours is by default: it
trades time for memory). Results: bench/results/grpo_trl-<time>.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, GROUP, ANSWER_LEN, BETA, LR, THREADS = 4, 4, 32, 0.04, 1e-6, 2
GRADER = {
    "type": "string_check",
    "name": "names_subject",
    "operation": "ilike",
    "input": "{{sample.output_text}}",
    "reference": "{{item.subject}}",
}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _steady(per_step: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each timing over the steps after the first, and answers per second over them."""
    rest = per_step[1:] or per_step
    out = {k: statistics.fmean(s[k] for s in rest) for k in rest[0]}
    out["samples_per_s"] = PROMPTS * GROUP / out["step_s"]
    return out


# ---------------------------------------------------------------------------- our side (one process)


def run_ours(model: str, steps: int, algorithm: str) -> dict[str, Any]:
    import torch

    from rlhf_engine.config.ppo import PPOConfig
    from rlhf_engine.stages.ppo import run

    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as out:
        common: dict[str, Any] = {
            "actor_model_name_or_path": model,
            "output_dir": out,
            "grader": json.dumps(GRADER),
            "data": {"data": ["bundled:questions"], "max_prompt_len": 128, "max_seq_len": 256},
            "actor": {"dtype": "fp32", "dropout": 0.0},
            "critic": {"dtype": "fp32", "dropout": 0.0},
            "max_answer_len": ANSWER_LEN,
            "per_device_training_batch_size": PROMPTS * GROUP,
            "actor_learning_rate": LR,
            "critic_learning_rate": LR,
            "num_warmup_steps": 0,
            "max_steps": steps,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "eval_max_rows": 1,
            "checkpoint_interval": 0,
            "rollouts_per_step": 0,
        }
        if algorithm == "grpo":
            cfg = PPOConfig(
                **common,
                algorithm="grpo",
                samples_per_prompt=GROUP,
                per_device_generation_batch_size=PROMPTS,
                kl_in="loss",
                kl_ctl=BETA,
            )
        else:  # PPO: as many answers per step, one per prompt, a critic from the same model
            cfg = PPOConfig(
                **common,
                algorithm="ppo",
                critic_model_name_or_path=model,
                per_device_generation_batch_size=PROMPTS * GROUP,
                kl_ctl=BETA,
            )
        run(cfg)
        lines = (Path(out) / "step3_rlhf" / "metrics.jsonl").read_text().splitlines()
    per_step = []
    for m in map(json.loads, lines):  # (our samples_per_s counts prompts: the step's unit)
        step_s = m["gen_s"] + m["score_s"] + m["train_s"] + m["other_s"]
        per_step.append(
            {
                "step_s": step_s,
                "generate_s": m["gen_s"],
                "score_s": m["score_s"],
                "train_s": m["train_s"],
                "answer_len": m["answer_len"],
            }
        )
    return {"steady": _steady(per_step), "peak_rss_mib": _peak_rss_mib(), "steps": len(per_step)}


# ---------------------------------------------------------------------------- TRL's side (one process)


def run_trl(model: str, steps: int) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from rlhf_engine.data.readers import read_dataset

    torch.set_num_threads(THREADS)
    rows = read_dataset("bundled:questions").rows[: PROMPTS * steps * 4]
    data = Dataset.from_list(
        [
            {"prompt": [m.as_dict() for m in r.conversation], "subject": (r.item or {})["subject"]}
            for r in rows
        ]
    )
    timers = {"generate_s": 0.0, "reward_s": 0.0}

    def names_subject(completions: list[Any], subject: list[str], **_: Any) -> list[float]:
        t = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        out = [float(s.lower() in text.strip().lower()) for text, s in zip(texts, subject, strict=True)]
        timers["reward_s"] += time.perf_counter() - t
        return out

    per_step: list[dict[str, float]] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.before = time.perf_counter(), dict(timers)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step_s = time.perf_counter() - self.t0
            gen, rew = (timers[k] - self.before[k] for k in ("generate_s", "reward_s"))
            per_step.append(
                {
                    "step_s": step_s,
                    "generate_s": gen,
                    "score_s": rew,
                    "train_s": step_s - gen - rew,
                    "answer_len": 0.0,
                }
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if per_step and logs and "completions/mean_length" in logs:
                per_step[-1]["answer_len"] = float(logs["completions/mean_length"])

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with tempfile.TemporaryDirectory() as out:
        args = trl.GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=PROMPTS * GROUP,
            num_generations=GROUP,
            steps_per_generation=1,
            num_iterations=1,
            max_completion_length=ANSWER_LEN,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=BETA,
            epsilon=0.2,
            loss_type="grpo",
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_steps=steps,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=0,
            disable_dropout=True,
            dataloader_num_workers=0,
            gradient_checkpointing=False,
            model_init_kwargs={"dtype": torch.float32},
        )
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=names_subject,
            args=args,
            train_dataset=data,
            processing_class=tok,
            callbacks=[Steps()],
        )
        generate = trainer.model.generate

        def timed_generate(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                timers["generate_s"] += time.perf_counter() - t

        trainer.model.generate = timed_generate
        trainer.train()
    return {
        "steady": _steady(per_step),
        "peak_rss_mib": _peak_rss_mib(),
        "steps": len(per_step),
        "trl": trl.__version__,
    }


# ---------------------------------------------------------------------------- the driver


def _models(names: list[str]) -> dict[str, str]:
    out = {}
    if "toy" in names:
        from rlhf_engine.models.tiny import build_tiny

        out["toy"] = str(build_tiny("llama", "m", pretrain_steps=200))
    if "smollm2" in names:
        from rlhf_engine.models.gguf import build_smollm2

        out["smollm2"] = str(build_smollm2())
    return out


def _child(side: str, model: str, steps: int) -> dict[str, Any]:
    python = sys.executable if side == "trl" else str(ROOT / ".venv" / "bin" / "python")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "ACCELERATE_USE_CPU": "1",
    }
    done = subprocess.run(
        [python, __file__, "--child", side, "--model", model, "--steps", str(steps)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        cwd=ROOT,
    )
    if done.returncode != 0:
        raise SystemExit(f"{side} on {model} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["toy", "smollm2"], choices=["toy", "smollm2"])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every side")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is dropped)")
    p.add_argument("--child", choices=["grpo", "ppo", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        result = run_trl(a.model, a.steps) if a.child == "trl" else run_ours(a.model, a.steps, a.child)
        print(json.dumps(result))
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit(
            "TRL is not installed here; run `make bench-trl` (it creates .venv-bench-trl)"
        ) from None
    sys.path.insert(0, str(ROOT / "bench"))
    from step3 import machine_probe

    report: dict[str, Any] = {
        "machine_before": machine_probe(),
        "setup": {
            "prompts_per_step": PROMPTS,
            "group": GROUP,
            "answer_len": ANSWER_LEN,
            "beta": BETA,
            "threads": THREADS,
            "rounds": a.rounds,
            "steps_per_run": a.steps,
        },
        "models": {},
    }
    for name, model in _models(a.models).items():
        runs: dict[str, list[dict[str, Any]]] = {"grpo": [], "trl": [], "ppo": []}
        for _ in range(a.rounds):
            for side in runs:
                runs[side].append(_child(side, model, a.steps))
                print(f"{name} {side}: {runs[side][-1]['steady']['samples_per_s']:.2f} answers/s", flush=True)
        summary = {}
        for side, rs in runs.items():
            keys = rs[0]["steady"].keys()
            summary[side] = {k: statistics.median(r["steady"][k] for r in rs) for k in keys}
            summary[side]["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
        summary["ours_vs_trl"] = summary["grpo"]["samples_per_s"] / summary["trl"]["samples_per_s"]
        summary["grpo_vs_ppo"] = summary["grpo"]["samples_per_s"] / summary["ppo"]["samples_per_s"]
        report["models"][name] = {
            "path": model,
            "summary": summary,
            "runs": runs,
            "trl_version": runs["trl"][0].get("trl"),
        }
    report["machine_after"] = machine_probe()
    out = ROOT / "bench" / "results" / f"grpo_trl-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=1))
    print("\n| model | side | answers/s | step s | generate s | score s | train s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in report["models"].items():
        for side in ("grpo", "trl", "ppo"):
            s = m["summary"][side]
            print(
                f"| {name} | {side} | {s['samples_per_s']:.2f} | {s['step_s']:.2f} | {s['generate_s']:.2f} | "
                f"{s['score_s']:.2f} | {s['train_s']:.2f} | {s['peak_rss_mib']:.0f} |"
            )
        print(
            f"{name}: ours/TRL {m['summary']['ours_vs_trl']:.2f}x, "
            f"our GRPO/PPO {m['summary']['grpo_vs_ppo']:.2f}x"
        )
    print(
        f"machine probe before/after: {report['machine_before']} / {report['machine_after']}\n"
        f"written to {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
