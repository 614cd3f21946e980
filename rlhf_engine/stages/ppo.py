"""Step 3: PPO (RLHF) — the loop around `PPOTrainer`, with the records, checkpoints and evaluation.

Each PPO step: `generation_batches` batches of prompts per process → experience; `ppo_epochs` passes
of `train_rlhf` over it in micro-batches of `per_device_training_batch_size` (plus a PPO-ptx step
on the plain-text corpus per micro-batch when `unsup_coef` > 0); one line of metrics; a few sampled
rollouts. Evaluation samples answers to held-out prompts (the step-3 eval split) with a fixed seed,
before and after, for the actor and (when on) its EMA.

    RUN/step3_rlhf/actor/        the chat model          RUN/step3_rlhf/metrics.jsonl, events.jsonl,
    RUN/step3_rlhf/critic/                               rollouts.jsonl, checkpoints/, summary.json
    RUN/step3_rlhf/actor_ema/    with enable_ema
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_engine.config.ppo import PPOConfig
from rlhf_engine.data.collate import collate_prompts
from rlhf_engine.data.pipeline import prepare_corpus, prepare_step
from rlhf_engine.data.tokenize import TokenizedSplit
from rlhf_engine.engine import checkpoint, fencing
from rlhf_engine.engine.deepspeed_setup import resolve_dtype, torch_dtype
from rlhf_engine.engine.distributed import Dist, barrier, init_distributed
from rlhf_engine.engine.rlhf_engine import RLHFEngine, check_hybrid_engine
from rlhf_engine.engine.saving import gathered_state_dict, load_full_state, save_hf_model
from rlhf_engine.engine.stopping import StepStopped, StopRequest
from rlhf_engine.models.loading import load_config, load_tokenizer, resolve_model
from rlhf_engine.stages.common import (
    all_reduce_sum,
    check_resumable,
    epoch_order,
    fingerprint_of,
    finished_summary,
    micro_batch_rows,
    rank_share,
    set_seed,
)
from rlhf_engine.stages.ppo_trainer import Experience, PPOTrainer, sequence_kl
from rlhf_engine.stages.records import Records, tensorboard_dir, wandb_settings

logger = logging.getLogger(__name__)

STEP_DIR = "step3_rlhf"
TITLE = "step 3 (PPO)"
ROLLOUTS = "rollouts.jsonl"


def check(config: PPOConfig) -> Any:
    """Everything about the input that can be wrong, before a process group or a model exists."""
    resolve_dtype(config.actor)
    resolve_dtype(config.critic)
    actor = resolve_model(config.actor_model_name_or_path, field="actor_model_name_or_path")
    actor_config = load_config(actor, kind="causal_lm", field="actor_model_name_or_path")
    tokenizer = load_tokenizer(actor, field="actor_model_name_or_path")
    for field, path in (("critic_model_name_or_path", config.critic_model_name_or_path),
                        ("reward_model_name_or_path", config.reward_path)):  # fmt: skip
        resolved = resolve_model(path, field=field)
        value_config = load_config(resolved, kind="value", field=field)
        _check_same_tokens(tokenizer, resolved, value_config, field=field)
    check_hybrid_engine(config, actor_config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_same_tokens(tokenizer: Any, path: str, value_config: Any, *, field: str) -> None:
    """The critic and reward model read the actor's token ids (DeepSpeed-Chat's design): a model built
    on another tokenizer would read them as other words, or index past its embedding."""
    fix = ("train the reward model from a model with the actor's tokenizer (e.g. `rlhf models tiny --tokenizer "
           "ACTOR_DIR` for a small one)")  # fmt: skip
    if value_config.vocab_size < len(tokenizer):
        raise ValueError(f"{field}: {path} has a vocabulary of {value_config.vocab_size} tokens, fewer than the "
                         f"actor's tokenizer ({len(tokenizer)}); {fix}")  # fmt: skip
    try:
        theirs = load_tokenizer(path, field=field)
    except ValueError:
        return  # no tokenizer files beside the weights: the vocabulary size is all there is to check
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"{field}: {path} was built on another tokenizer than the actor's (their vocabularies "
                         f"differ); {fix}")  # fmt: skip


class _Accumulator:
    """Sums of per-batch metrics (weighted by rows) to average over a step and every rank."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.rows = 0.0

    def add(self, metrics: dict[str, float], rows: int) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * rows
        self.rows += rows

    def reduce(self, device: str) -> dict[str, float]:
        keys = sorted(self.sums)
        total = all_reduce_sum([self.sums[k] for k in keys] + [self.rows], device)
        return {k: total[i] / max(total[-1], 1.0) for i, k in enumerate(keys)}


def _score_stats(scores: list[float], device: str) -> tuple[float, float]:
    n, s, s2 = all_reduce_sum([len(scores), sum(scores), sum(x * x for x in scores)], device)
    mean = s / max(n, 1.0)
    return mean, math.sqrt(max(s2 / max(n, 1.0) - mean * mean, 0.0))


def evaluate(trainer: PPOTrainer, split: TokenizedSplit, *, max_rows: int, batch_size: int, dist: Dist,
             seed: int, use_ema: bool = False) -> dict[str, Any]:  # fmt: skip
    """Reward, KL and answer length of sampled answers to held-out prompts (fixed sampling seed).

    Every rank runs the same number of batches (ZeRO-3 forward passes are collective); padding rows
    carry weight 0.
    """
    engine = trainer.engine
    mine, weights = rank_share(min(max_rows or len(split), len(split)), dist)
    totals = [0.0, 0.0, 0.0, 0.0]  # rows, reward, kl, answer length
    actor = engine.actor
    if use_ema:  # generate (and score log-probs) with the EMA weights instead of the actor's
        engine.actor = engine.actor_ema
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919 + dist.rank)
            for i in range(0, len(mine), batch_size):
                batch = collate_prompts([split.row(j) for j in mine[i : i + batch_size]], trainer.pad_id)
                w = torch.tensor(weights[i : i + batch_size])
                exp = trainer.generate_experience(batch)
                totals[0] += float(w.sum())
                totals[1] += float((exp.scores.cpu() * w).sum())
                totals[2] += float((sequence_kl(exp).cpu() * w).sum())
                totals[3] += float((exp.answer_lengths.cpu().float() * w).sum())
    finally:
        engine.actor = actor
    rows, reward, kl, length = all_reduce_sum(totals, dist.device)
    rows = max(rows, 1.0)
    return {"reward_mean": reward / rows, "kl_to_ref": kl / rows, "answer_len": length / rows, "prompts": rows}


def _rollouts(trainer: PPOTrainer, exp: Experience, step: int, k: int) -> list[dict[str, Any]]:
    tok = trainer.tokenizer
    kl = sequence_kl(exp)
    out = []
    for i in range(min(k, len(exp))):
        prompt = exp.seq[i, : exp.prompt_len][exp.attention_mask[i, : exp.prompt_len] > 0]
        answer = exp.seq[i, exp.prompt_len :][exp.action_mask[i] > 0]
        out.append({"step": step, "prompt": tok.decode(prompt, skip_special_tokens=True),
                    "answer": tok.decode(answer, skip_special_tokens=True), "reward": float(exp.scores[i]),
                    "kl": float(kl[i]), "degenerate": bool(exp.degenerate[i])})  # fmt: skip
    return out


def _save_models(engine: RLHFEngine, cfg: PPOConfig, step_dir: Path, dist: Dist) -> None:
    """actor/, critic/ (and actor_ema/) as Hugging Face folders (collective at ZeRO-3)."""
    tok = engine.tokenizer
    jobs = [("actor", engine.actor.module, cfg.actor.zero_stage, "causal_lm", engine.actor_config, engine.actor_lora,
             engine.actor_dropout_restore, engine.actor_path, engine.actor_dtype),
            ("critic", engine.critic.module.model, cfg.critic.zero_stage, "value", engine.critic_config,
             engine.critic_lora, engine.critic_dropout_restore, engine.critic_path, engine.critic_dtype)]  # fmt: skip
    if engine.actor_ema is not None:
        jobs.append(("actor_ema", engine.actor_ema.module, engine.actor_ema.zero_optimization_stage(), "causal_lm",
                     engine.actor_config, engine.actor_lora, engine.actor_dropout_restore, engine.actor_path,
                     engine.actor_dtype))  # fmt: skip
    for name, module, stage, kind, model_config, lora, restore, src, dtype in jobs:
        state = gathered_state_dict(module, zero_stage=stage, is_main=dist.is_main)
        if dist.is_main:
            import copy

            save_hf_model(state, config=copy.deepcopy(model_config), kind=kind, out=step_dir / name, lora=lora,  # type: ignore[arg-type]
                          dropout_restore=restore, tokenizer=tok, tokenizer_src=src, dtype=torch_dtype(dtype))  # fmt: skip
    barrier()


def run(config: PPOConfig) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    step_dir = Path(config.output_dir) / STEP_DIR
    if (summary := finished_summary(step_dir, config, TITLE)) is not None:
        return summary
    tokenizer = check(config)
    dist = init_distributed()
    records = Records(step_dir, enabled=dist.is_main, title=TITLE, tensorboard=tensorboard_dir(config, step_dir),
                      wandb=wandb_settings(config, step_dir))
    try:
        return _run(config, dist, step_dir, records, tokenizer)
    except (StepStopped, fencing.Superseded):  # stopped or superseded: not an error of the step
        raise
    except Exception as e:
        records.event("error", f"{type(e).__name__}: {e}", level="error")
        raise
    finally:
        records.close()


def _run(cfg: PPOConfig, dist: Dist, step_dir: Path, records: Records, tokenizer: Any) -> dict[str, Any]:
    started = time.monotonic()
    set_seed(cfg.seed)
    if dist.is_main:
        prepared = prepare_step(cfg.data, 3, tokenizer)
    barrier()
    if not dist.is_main:
        prepared = prepare_step(cfg.data, 3, tokenizer)
    gen_bs, world = cfg.per_device_generation_batch_size, dist.world_size
    prompts_per_step, how = cfg.batch_rows(world)
    steps_per_epoch = len(prepared.train) // prompts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{how} is more than the {len(prepared.train)} step-3 prompts; lower it or add data")
    total = cfg.num_train_epochs * steps_per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    unsup = None
    if cfg.unsup_coef > 0:
        unsup = torch.as_tensor(prepare_corpus(cfg.data, tokenizer, cfg.data.max_prompt_len + cfg.max_answer_len))

    engine = RLHFEngine(actor_model_name_or_path=cfg.actor_model_name_or_path,
                        critic_model_name_or_path=cfg.critic_model_name_or_path, tokenizer=tokenizer,
                        num_total_iters=total * cfg.optimizer_steps_per_ppo_step(), args=cfg,
                        reward_model_name_or_path=cfg.reward_path)  # fmt: skip
    trainer = PPOTrainer(engine=engine, args=cfg)
    trainable = {"actor": engine.actor, "critic": engine.critic}

    ckpt_root = step_dir / "checkpoints"
    fingerprint = fingerprint_of(cfg, world)
    done = checkpoint.complete_checkpoints(ckpt_root) if cfg.resume and not cfg.overwrite else []
    start_step = 0
    first: dict[str, Any] = {}
    eval_before: dict[str, Any] | None = None
    if done:
        check_resumable(checkpoint.read_state(done[-1][1]), fingerprint, done[-1][1])
        state, extra = checkpoint.load(trainable, done[-1][1], dist=dist)
        if engine.actor_ema is not None:
            load_full_state(engine.actor_ema.module, extra, zero_stage=engine.actor_ema.zero_optimization_stage(),
                            is_main=dist.is_main)  # fmt: skip
        start_step, first, eval_before = state["global_step"], state["first"], state["eval_before"]
        records.truncate(start_step)
        records.truncate(start_step, name=ROLLOUTS)
        records.event("step_started", f"{TITLE}: resuming at step {start_step} of {total}",
                      resumed_from=str(done[-1][1]), global_step=start_step, total_steps=total)  # fmt: skip
    else:
        if dist.is_main:
            records.reset()
            (step_dir / ROLLOUTS).unlink(missing_ok=True)
            shutil.rmtree(ckpt_root, ignore_errors=True)
        barrier()
        records.event("step_started", f"{TITLE}: {total} steps of {prompts_per_step} prompts",
                      total_steps=total, prompts_per_step=prompts_per_step, processes=world,
                      engines=engine.init_counts, train_prompts=len(prepared.train),
                      eval_prompts=len(prepared.eval), data=prepared.report_dicts())  # fmt: skip

    def run_eval(at_step: int, *, use_ema: bool = False) -> dict[str, Any]:
        result = evaluate(trainer, prepared.eval, max_rows=cfg.eval_max_rows, batch_size=gen_bs, dist=dist,
                          seed=cfg.seed, use_ema=use_ema)  # fmt: skip
        who = "EMA actor" if use_ema else "actor"
        records.event("eval", f"eval of the {who} at step {at_step}: reward {result['reward_mean']:.4g}, "
                      f"KL {result['kl_to_ref']:.4g}", global_step=at_step, model=who, **result)  # fmt: skip
        return result

    if eval_before is None:
        eval_before = run_eval(0)

    stop = StopRequest(step_dir, dist)
    unsup_order = torch.randperm(len(unsup), generator=torch.Generator().manual_seed(cfg.seed)) if unsup is not None else None
    last: dict[str, Any] = {}
    for step in range(start_step, total):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(prepared.train), cfg.seed, epoch)
        t0 = time.monotonic()
        experiences, gen_s, score_s = [], 0.0, 0.0
        scores: list[float] = []
        acc, train_acc = _Accumulator(), _Accumulator()  # experience metrics per answer, training per update
        for g in range(cfg.generation_batches):
            rows = micro_batch_rows(order, in_epoch, micro=gen_bs, accum=cfg.generation_batches, world=world,
                                    rank=dist.rank, index=g)  # fmt: skip
            exp = trainer.generate_experience(collate_prompts([prepared.train.row(j) for j in rows], trainer.pad_id))
            experiences.append(exp)
            gen_s += exp.gen_seconds
            score_s += exp.score_seconds
            scores += exp.scores.tolist()
            acc.add(trainer.experience_metrics(exp), len(exp))
        for w in trainer.warnings:
            records.event("warning", w, level="warning", global_step=step + 1)
        trainer.warnings.clear()
        t1 = time.monotonic()
        unsup_losses: list[float] = []
        mb = cfg.per_device_training_batch_size
        minis_per_step = cfg.ppo_epochs * cfg.generation_batches * math.ceil(gen_bs / mb)
        m = 0
        for _ in range(cfg.ppo_epochs):
            for exp in experiences:
                for mini in exp.split(mb):
                    if unsup is not None and unsup_order is not None:
                        # the corpus in a seeded order, each rank its own rows, continuing across steps
                        start = ((step * minis_per_step + m) * world + dist.rank) * mb
                        take = unsup_order[[(start + i) % len(unsup) for i in range(mb)]]
                        *_, lm_loss = trainer.train_rlhf_with_unsupervised(mini, unsup[take])
                        unsup_losses.append(float(lm_loss))
                    else:
                        trainer.train_rlhf(mini)
                    train_acc.add(trainer.last_metrics, len(mini))
                    m += 1
        train_s = time.monotonic() - t1
        means = {**acc.reduce(dist.device), **train_acc.reduce(dist.device)}
        reward_mean, reward_std = _score_stats(scores, dist.device)
        gen_tokens = all_reduce_sum([float(sum(e.answer_lengths.sum() for e in experiences)), gen_s], dist.device)
        unsup_loss = (all_reduce_sum([sum(unsup_losses), len(unsup_losses)], dist.device)
                      if unsup_losses else [0.0, 0.0])  # fmt: skip
        seconds = time.monotonic() - t0
        last = {
            "reward_mean": reward_mean, "reward_std": reward_std, "kl_to_ref": means["kl_to_ref"],
            "loss": means["actor_loss"], "actor_loss": means["actor_loss"], "critic_loss": means["critic_loss"],
            "unsup_loss": unsup_loss[0] / unsup_loss[1] if unsup_loss[1] else None,
            "clip_frac": means["clip_frac"], "value_clip_frac": means["value_clip_frac"],
            "answer_len": means["answer_len"], "degenerate_rate": means["degenerate_rate"],
            "gen_s": gen_s, "score_s": score_s, "train_s": train_s, "other_s": seconds - gen_s - score_s - train_s,
            "samples_per_s": prompts_per_step / seconds,
            "tokens_per_s": gen_tokens[0] / max(gen_tokens[1] / world, 1e-9),
            "tokens": int(gen_tokens[0]),  # answer tokens generated (and trained on) this step
        }  # fmt: skip
        if torch.cuda.is_available():
            last["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if not first:
            first = dict(last)
        records.metric(step=step + 1, epoch=round(epoch + (in_epoch + 1) / steps_per_epoch, 4),
                       lr=engine.actor.get_lr()[0], critic_lr=engine.critic.get_lr()[0], **last)  # fmt: skip
        if dist.is_main and cfg.rollouts_per_step:
            records.rollouts(ROLLOUTS, _rollouts(trainer, experiences[0], step + 1, cfg.rollouts_per_step), step + 1)
        done_steps = step + 1
        if cfg.eval_interval and done_steps % cfg.eval_interval == 0 and done_steps < total:
            run_eval(done_steps)
        stopping = done_steps < total and stop.requested()
        if done_steps < total and (stopping or (cfg.checkpoint_interval and done_steps % cfg.checkpoint_interval == 0)):
            ema_state = (gathered_state_dict(engine.actor_ema.module, zero_stage=engine.actor_ema.zero_optimization_stage(),
                                             is_main=dist.is_main) if engine.actor_ema is not None else None)  # fmt: skip
            folder = checkpoint.save(trainable, ckpt_root, global_step=done_steps, dist=dist, keep=cfg.keep_checkpoints,
                                     state={"total_steps": total, "first": first, "eval_before": eval_before,
                                            "fingerprint": fingerprint}, extra=ema_state)  # fmt: skip
            records.event("checkpoint_saved", f"checkpoint at step {done_steps}", path=str(folder),
                          global_step=done_steps)  # fmt: skip
            if stopping:
                records.event("step_stopped", f"step 3: stopped at step {done_steps} of {total}; rerun to resume",
                              global_step=done_steps, path=str(folder))  # fmt: skip
                raise StepStopped(done_steps, folder)
    eval_after = run_eval(total)
    eval_ema = run_eval(total, use_ema=True) if engine.actor_ema is not None else None

    _save_models(engine, cfg, step_dir, dist)
    summary: dict[str, Any] = {}
    if dist.is_main:
        summary = {
            "step": STEP_DIR,
            "model_path": str(step_dir / "actor"),
            "ema_model_path": str(step_dir / "actor_ema") if eval_ema else None,
            "global_steps": total,
            "processes": world,
            "seconds": round(time.monotonic() - started, 2),
            "reward_mean_first": first.get("reward_mean"),
            "reward_mean_last": last.get("reward_mean", first.get("reward_mean")),
            "kl_to_ref_last": last.get("kl_to_ref", first.get("kl_to_ref")),
            "eval_reward_before": eval_before["reward_mean"],
            "eval_reward_after": eval_after["reward_mean"],
            "eval_kl_to_ref_after": eval_after["kl_to_ref"],
            "eval_answer_len_after": eval_after["answer_len"],
            "ema_eval_reward": eval_ema["reward_mean"] if eval_ema else None,
            "ema_eval_kl_to_ref": eval_ema["kl_to_ref"] if eval_ema else None,
            "engines": engine.init_counts,
            "options": fingerprint,
        }
        records.event("step_finished", f"{TITLE} finished", **{k: v for k, v in summary.items() if k != "options"})
        records.summary(summary)
    barrier()
    return summary

