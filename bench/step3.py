"""Step-3 throughput: our PPO path against DeepSpeed-Chat's loop, lever by lever (`make bench`).

Same machine, same DeepSpeed engines and ZeRO stage, same prompts, same hyperparameters, same number
of experiences per PPO step (64) and the same answers' length (forced to `--answer-len` tokens so the
work is identical). The configurations of one ZeRO stage share a process and one set of engines and
take turns, step by step (order rotating), so that drift in the machine's speed — seen here as ±20%
between runs minutes apart — hits all of them alike; plain `generate` takes its turn too:

  baseline     DeepSpeed-Chat with its hybrid engine off: 4 generate calls of 16 prompts (generation
               batch = training batch), Hugging Face `generate` with its defaults (KV cache on), a
               separate full forward pass per model to score (actor, reference, critic, reward), and
               its train_rlhf: the actor's log-probs over the whole sequence, sliced to the answer
  +keep        … scoring and training compute the LM head only over the answer positions (logits_to_keep)
  +reuse       … the actor's log-probs come from the logits `generate` already produced (one pass less)
  +wide        … one generate call of 64 prompts, trained in 4 micro-batches of 16
  +reserve     … the KV cache reserves room for the answer and is written in place, where Hugging
               Face's default cache copies itself on every token
  +prefix      … the start every prompt shares (a chat template's system prompt: 24 of SmolLM2's 42
               tokens) runs once, for generation and for the reference model's scoring (= ours)
  zero3 pair   baseline and ours again at ZeRO-3 (a second process): per-layer gathers on every token
               vs one gather per call

Reports samples/s, the generation / scoring / training / other split per step (as DeepSpeed-Chat's
step-3 log does), generation tokens/s against plain `generate` on a plain copy of the actor, and the
cost of the train↔generate switch. JSON goes to bench/results/.

    python bench/step3.py [--actor-size m --critic-size s --steps 4 --answer-len 48]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXPERIENCES = 64
TRAIN_BATCH = 16


def _config(
    zero: int,
    *,
    wide: bool,
    keep: bool,
    reuse: bool,
    reserve: bool,
    prefix: bool = False,
    gather: bool = True,
) -> dict[str, Any]:
    return {
        "zero": zero,
        "wide": wide,
        "keep": keep,
        "reuse": reuse,
        "reserve": reserve,
        "prefix": prefix,
        "gather": gather,
    }


CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": _config(0, wide=False, keep=False, reuse=False, reserve=False),
    "+keep": _config(0, wide=False, keep=True, reuse=False, reserve=False),
    "+reuse": _config(0, wide=False, keep=True, reuse=True, reserve=False),
    "+wide": _config(0, wide=True, keep=True, reuse=True, reserve=False),
    "+reserve": _config(0, wide=True, keep=True, reuse=True, reserve=True),
    "+prefix (ours)": _config(0, wide=True, keep=True, reuse=True, reserve=True, prefix=True),
    "zero3 baseline": _config(3, wide=False, keep=False, reuse=False, reserve=False, gather=False),
    "zero3 ours": _config(3, wide=True, keep=True, reuse=True, reserve=True, prefix=True),
}


def _models(model: str, actor_size: str, critic_size: str) -> tuple[Path, Path]:
    """(actor, critic): OPT-shaped tiny models, or SmolLM2-135M-Instruct (a 49k vocabulary, so the LM
    head is a large share of the work) with the Llama-shaped critic on its tokenizer that `rlhf demo
    --model smollm2` uses (bundled `smollm2-rm-xs`)."""
    from rlhf_engine.models.tiny import build_tiny

    if model == "smollm2":
        from rlhf_engine.models.gguf import build_smollm2

        return build_smollm2(), build_tiny("llama", "xs", pretrain_steps=200, tokenizer_from="smollm2")
    return build_tiny("opt", actor_size), build_tiny("opt", critic_size)  # type: ignore[arg-type]


def run_group(names: list[str], actor: str, critic: str, steps: int, answer_len: int) -> dict[str, Any]:
    """Configurations that share a ZeRO stage, in this process, on one set of engines, interleaved:
    every PPO step runs each configuration once (in rotating order), so a machine whose speed drifts
    during the run slows them all alike. Returns per-step timings per configuration."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_engine import PPOConfig, PPOTrainer, RLHFEngine
    from rlhf_engine.algorithms.ppo import policy_loss, token_logprobs
    from rlhf_engine.data.collate import collate_prompts
    from rlhf_engine.data.prepare import prepare_step
    from rlhf_engine.models.value import sequence_scores
    from rlhf_engine.runtime import generation
    from rlhf_engine.stages.ppo_trainer import Experience, answer_mask, degenerate_rows

    zero = CONFIGS[names[0]]["zero"]
    opts = {"zero_stage": zero, "dropout": 0.0}
    if zero == 3:
        opts["zero_param_persistence_threshold"] = 0
    args = PPOConfig(
        actor_model_name_or_path=actor,
        critic_model_name_or_path=critic,
        per_device_generation_batch_size=EXPERIENCES,
        per_device_training_batch_size=TRAIN_BATCH,
        generation_batches=1,
        max_answer_len=answer_len,
        num_warmup_steps=0,
        actor=opts,
        critic=dict(opts),
    )
    tok = AutoTokenizer.from_pretrained(actor)
    prompts = prepare_step(args.data, 3, tok).train
    engine = RLHFEngine(
        actor_model_name_or_path=actor,
        critic_model_name_or_path=critic,
        tokenizer=tok,
        num_total_iters=(steps + 1) * len(names) * 4,
        args=args,
    )
    trainer = PPOTrainer(engine=engine, args=args)
    trainer.generate_kwargs = {"min_new_tokens": answer_len}  # identical work in every configuration
    plain = AutoModelForCausalLM.from_pretrained(actor).eval() if zero == 0 else None

    def baseline_experience(batch: dict[str, torch.Tensor]) -> Experience:
        """DeepSpeed-Chat's generate_experience: plain generate, one full forward per model."""
        t0 = time.monotonic()
        seq = trainer._generate(batch["input_ids"], batch["attention_mask"])
        gen_s = time.monotonic() - t0
        P = batch["input_ids"].shape[1]
        answers = seq[:, P:]
        am = answer_mask(answers, trainer.eos_id)
        attn = torch.cat([batch["attention_mask"], am], 1)
        t1 = time.monotonic()
        with torch.no_grad():
            lp = token_logprobs(generation.lm_logits(engine.actor, seq, attn)[:, P - 1 : -1], answers)
            rlp = token_logprobs(generation.lm_logits(engine.ref, seq, attn)[:, P - 1 : -1], answers)
            values = engine.critic(seq, attn)[:, P - 1 : -1]
            scores = sequence_scores(engine.reward(seq, attn), attn)
        return Experience(
            seq,
            attn,
            P,
            am,
            lp,
            rlp,
            values,
            scores,
            degenerate_rows(answers, am, trainer.eos_id),
            gen_seconds=gen_s,
            score_seconds=time.monotonic() - t1,
        )

    def baseline_train(exp: Experience) -> None:
        """DeepSpeed-Chat's train_rlhf: its actor_loss_fn takes the log-probs of the whole sequence
        (the LM head and log-softmax over every position) and slices the answer out; the same losses
        and the same critic step as ours."""
        advantages, returns = trainer.advantages(exp)
        engine.actor.train()
        logits = generation.lm_logits(engine.actor, exp.seq, exp.attention_mask)
        logprobs = token_logprobs(logits[:, :-1], exp.seq[:, 1:])[:, exp.prompt_len - 1 :]
        actor_loss, _ = policy_loss(
            logprobs, exp.logprobs, advantages, exp.action_mask.float(), cliprange=trainer.args.cliprange
        )
        engine.actor.backward(actor_loss)
        engine.actor.step()
        trainer.critic_step(exp, returns)

    def ppo_step(c: dict[str, Any], step: int) -> dict[str, float]:
        trainer.gather_for_generation = c["gather"]
        trainer.reserve_kv_cache = c["reserve"]
        trainer.share_prompt_prefix = c["prefix"]
        trainer.args.reuse_generation_logits = c["reuse"]
        make = trainer.generate_experience if c["keep"] else baseline_experience
        train = trainer.train_rlhf if c["keep"] else baseline_train
        gen_bs = EXPERIENCES if c["wide"] else TRAIN_BATCH
        t0 = time.monotonic()
        exps = []
        for g in range(EXPERIENCES // gen_bs):
            rows = [prompts.row((step * EXPERIENCES + g * gen_bs + i) % len(prompts)) for i in range(gen_bs)]
            exps.append(make(collate_prompts(rows, tok.pad_token_id)))
        t1 = time.monotonic()
        for exp in exps:
            for mini in exp.split(TRAIN_BATCH):
                train(mini)
        t2 = time.monotonic()
        gen = sum(e.gen_seconds for e in exps)
        score = sum(e.score_seconds for e in exps)
        return {
            "step_s": t2 - t0,
            "gen_s": gen,
            "score_s": score,
            "train_s": t2 - t1,
            "other_s": (t1 - t0) - gen - score,
            "gen_tokens": sum(int(e.answer_lengths.sum()) for e in exps),
            "rss_mb": _rss_mb(),
        }

    def plain_generate(step: int) -> dict[str, float]:
        """Hugging Face generate on a plain (non-DeepSpeed) copy of the actor, the same 64 prompts."""
        assert plain is not None
        rows = [prompts.row((step * EXPERIENCES + i) % len(prompts)) for i in range(EXPERIENCES)]
        b = collate_prompts(rows, tok.pad_token_id)
        t = time.monotonic()
        with torch.no_grad():
            out = plain.generate(
                **b,
                max_new_tokens=answer_len,
                min_new_tokens=answer_len,
                do_sample=True,
                top_k=0,
                pad_token_id=tok.pad_token_id,
            )
        return {
            "gen_s": time.monotonic() - t,
            "gen_tokens": (out.shape[1] - b["input_ids"].shape[1]) * EXPERIENCES,
        }

    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    plain_steps: list[dict[str, float]] = []
    for step in range(steps + 1):  # step 0 warms up (allocations, first-call costs)
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            r = ppo_step(CONFIGS[name], step)
            if step:
                results[name].append(r)
        if plain is not None:
            r = plain_generate(step)
            if step:
                plain_steps.append(r)
    # the switch itself: eval/train + (at ZeRO-3) gather and hook changes, without generating
    switch = {}
    for name in names:
        times = []
        for _ in range(5):
            t = time.monotonic()
            with generation.generation_mode(engine.actor, gather=CONFIGS[name]["gather"]):
                pass
            times.append(time.monotonic() - t)
        switch[name] = sorted(times)[len(times) // 2]
    return {"steps": results, "switch_s": switch, "plain": plain_steps}


def _rss_mb() -> float:
    """Resident memory of this process (MB): growth across steps shows memory held between them."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def machine_probe() -> dict[str, float]:
    """GFLOPS of two fp32 matmuls: one that streams its 4 MB weight for 16 rows (what small-batch
    decoding waits on: memory bandwidth, which other tenants of this machine share) and one that
    computes (what training waits on). They tell two runs' machines apart."""
    import torch

    out = {}
    for name, rows in (("linear_16_rows_gflops", 16), ("linear_1024_rows_gflops", 1024)):
        x, w = torch.randn(rows, 512), torch.randn(2048, 512)
        for _ in range(5):
            torch.nn.functional.linear(x, w)
        n, t = 50, time.perf_counter()
        for _ in range(n):
            torch.nn.functional.linear(x, w)
        out[name] = 2 * rows * 512 * 2048 * n / (time.perf_counter() - t) / 1e9
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: OPT-shaped actor/critic of --actor-size/--critic-size; smollm2: the real checkpoint",
    )
    p.add_argument("--actor-size", default="m")
    p.add_argument("--critic-size", default="s")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--answer-len", type=int, default=48)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--group", nargs="+", help=argparse.SUPPRESS)  # internal: run configurations, print JSON
    ns = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    actor, critic = (str(x) for x in _models(ns.model, ns.actor_size, ns.critic_size))
    if ns.group:
        print("RESULT " + json.dumps(run_group(ns.group, actor, critic, ns.steps, ns.answer_len)))
        return 0

    def child(names: list[str]) -> dict[str, Any]:
        cmd = [
            sys.executable,
            __file__,
            "--model",
            ns.model,
            "--actor-size",
            ns.actor_size,
            "--critic-size",
            ns.critic_size,
            "--steps",
            str(ns.steps),
            "--answer-len",
            str(ns.answer_len),
            "--group",
            *names,
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{names} failed:\n{done.stderr[-3000:]}")
        return dict(json.loads(line[7:]))

    rows: dict[str, dict[str, Any]] = {}
    plain: dict[str, float] = {}
    probe_before = machine_probe()
    for zero in sorted({CONFIGS[n]["zero"] for n in ns.configs}):
        names = [n for n in ns.configs if CONFIGS[n]["zero"] == zero]
        r = child(names)
        if r["plain"]:
            plain = {
                "tokens_per_s": sum(s["gen_tokens"] for s in r["plain"]) / sum(s["gen_s"] for s in r["plain"])
            }
        for name in names:
            steps = r["steps"][name]
            rows[name] = {
                "samples_per_s": EXPERIENCES / _mean(steps, "step_s"),
                "step_s": _mean(steps, "step_s"),
                "gen_s": _mean(steps, "gen_s"),
                "score_s": _mean(steps, "score_s"),
                "train_s": _mean(steps, "train_s"),
                "other_s": _mean(steps, "other_s"),
                "gen_tokens_per_s": sum(s["gen_tokens"] for s in steps) / sum(s["gen_s"] for s in steps),
                "switch_s": r["switch_s"][name],
                "steps": steps,
            }
            print(f"{name}: {rows[name]['samples_per_s']:.2f} samples/s", flush=True)

    import platform

    import torch

    probe_after = machine_probe()
    base = rows.get("baseline")
    probe = "; ".join(f"{k[:-6]} {probe_before[k]:.0f} → {probe_after[k]:.0f} GFLOPS" for k in probe_before)
    print(f"\nmachine before → after: {probe}")
    print(
        f"step 3, {EXPERIENCES} experiences per step, answers {ns.answer_len} tokens, actor "
        f"{Path(actor).name if ns.model == 'smollm2' else ns.actor_size}, critic {Path(critic).name}; "
        f"plain generate: {plain.get('tokens_per_s', float('nan')):.0f} tokens/s"
    )
    header = (
        f"{'config':16} {'samples/s':>9} {'×base':>6} {'step s':>7} {'gen':>6} {'score':>6} {'train':>6} "
        f"{'other':>6} {'gen tok/s':>9} {'switch %':>8} {'×base per step':>15}"
    )
    print(header)
    for name, r in rows.items():
        ref = rows["zero3 baseline"] if name.startswith("zero3") and "zero3 baseline" in rows else base
        speed = r["samples_per_s"] / ref["samples_per_s"] if ref else float("nan")
        paired = (
            sorted(b["step_s"] / o["step_s"] for b, o in zip(ref["steps"], r["steps"], strict=True))
            if ref
            else []
        )
        spread = f"{paired[0]:.2f}-{paired[-1]:.2f}" if paired else ""
        split = [100 * r[k] / r["step_s"] for k in ("gen_s", "score_s", "train_s", "other_s")]
        print(
            f"{name:16} {r['samples_per_s']:9.2f} {speed:6.2f} {r['step_s']:7.2f} "
            f"{split[0]:5.0f}% {split[1]:5.0f}% {split[2]:5.0f}% {split[3]:5.0f}% "
            f"{r['gen_tokens_per_s']:9.0f} {100 * r['switch_s'] / r['step_s']:8.3f} {spread:>15}"
        )
    out = ROOT / "bench" / "results" / f"step3-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "cuda": torch.cuda.is_available(),
                    "probe_before": probe_before,
                    "probe_after": probe_after,
                },
                "settings": vars(ns),
                "plain_generate": plain,
                "configs": rows,
            },
            indent=2,
        )
    )
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
