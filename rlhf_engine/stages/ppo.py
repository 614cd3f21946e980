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
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_engine import graders
from rlhf_engine.config.ppo import PPOConfig
from rlhf_engine.data.collate import collate_prompts
from rlhf_engine.data.prepare import prepare_corpus
from rlhf_engine.data.tokenize import TokenizedSplit, decode_item
from rlhf_engine.models.loading import load_config, load_tokenizer, resolve_model
from rlhf_engine.runtime.deepspeed_setup import resolve_dtype, torch_dtype
from rlhf_engine.runtime.distributed import Dist, barrier
from rlhf_engine.runtime.engines import RLHFEngine, check_hybrid_engine
from rlhf_engine.runtime.saving import gathered_state_dict, load_full_state, save_hf_model
from rlhf_engine.stages import phase
from rlhf_engine.stages.common import all_reduce_sum, rank_share
from rlhf_engine.stages.loop import Evaluation, Loop, Objective, Row, run_objective
from rlhf_engine.stages.ppo_trainer import Experience, PPOTrainer, sequence_kl

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
    value_models = [("reward_model_name_or_path", config.reward_path)] if config.reward_path else []
    if (grader := config.parsed_grader()) is not None:  # its score_model parts read the actor's tokens too
        value_models += [("grader.model", m) for m in sorted(grader.score_models())]
    if config.algorithm == "ppo":  # grpo and rloo train no critic
        value_models.insert(0, ("critic_model_name_or_path", config.critic_model_name_or_path))
    for field, path in value_models:
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
    fix = (
        "train the reward model from a model with the actor's tokenizer (e.g. `rlhf models tiny --tokenizer "
        "ACTOR_DIR` for a small one)"
    )
    if value_config.vocab_size < len(tokenizer):
        raise ValueError(
            f"{field}: {path} has a vocabulary of {value_config.vocab_size} tokens, fewer than the "
            f"actor's tokenizer ({len(tokenizer)}); {fix}"
        )
    try:
        theirs = load_tokenizer(path, field=field)
    except ValueError:
        return  # no tokenizer files beside the weights: the vocabulary size is all there is to check
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"{field}: {path} was built on another tokenizer than the actor's (their vocabularies "
            f"differ); {fix}"
        )


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


def row_items(rows: list[Row]) -> list[dict[str, Any]]:
    """Each step-3 row's item (its other fields: what a grader reads)."""
    return [decode_item(r["item"]) if "item" in r else {} for r in rows]


def check_runnable(grader: graders.Grader) -> None:
    """What the grader needs beyond this process is there: the service's judges for model graders, the
    sandbox for python ones. Found before training, not as a step of zeros."""
    from rlhf_engine import judging, sandbox

    if grader.judges() and judging.from_environment() is None:
        where, model, _ = grader.judges()[0]
        raise graders.GraderError(
            where,
            f"{model} is a judge (a chat model prompted per sample), asked through the service's inference "
            "workers: run this as a job of the service, or grade with string_check, text_similarity, "
            "python or a reward model",
        )
    if grader.embeds() and judging.embedder_from_environment() is None:
        raise graders.GraderError(
            grader.embeds()[0],
            "cosine compares embeddings by the service's embedding model on its inference workers: run this "
            "as a job of the service, or choose another evaluation_metric",
        )
    if grader.has_python() and (why := sandbox.unavailable()) is not None:
        raise graders.GraderError("grader.type", why)


def check_items(grader: graders.Grader, split: TokenizedSplit, what: str) -> None:
    """Every row has the fields the grader's templates read: found before training, not at step 900."""
    if not grader.item_fields() or not len(split):
        return
    items = split.columns["item"]
    for i in range(len(split)):
        try:
            graders.check_row(grader, decode_item(items[i]), where="grader")
        except graders.GraderError as e:
            raise graders.GraderError(
                e.param, f"{str(e).removeprefix(e.param + ': ')} ({what} row {i + 1} of step 3's prompts)"
            ) from None


def _score_stats(scores: list[float], device: str) -> tuple[float, float]:
    n, s, s2 = all_reduce_sum([len(scores), sum(scores), sum(x * x for x in scores)], device)
    mean = s / max(n, 1.0)
    return mean, math.sqrt(max(s2 / max(n, 1.0) - mean * mean, 0.0))


def evaluate(
    trainer: PPOTrainer,
    split: TokenizedSplit,
    *,
    max_rows: int,
    batch_size: int,
    dist: Dist,
    seed: int,
    use_ema: bool = False,
) -> dict[str, Any]:
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
                phase.tick()
                batch = [split.row(j) for j in mine[i : i + batch_size]]
                w = torch.tensor(weights[i : i + batch_size])
                exp = trainer.generate_experience(
                    collate_prompts(batch, trainer.pad_id), samples=1, items=row_items(batch)
                )
                totals[0] += float(w.sum())
                totals[1] += float((exp.scores.cpu() * w).sum())
                totals[2] += float((sequence_kl(exp).cpu() * w).sum())
                totals[3] += float((exp.answer_lengths.cpu().float() * w).sum())
    finally:
        engine.actor = actor
    rows, reward, kl, length = all_reduce_sum(totals, dist.device)
    rows = max(rows, 1.0)
    return {
        "reward_mean": reward / rows,
        "kl_to_ref": kl / rows,
        "answer_len": length / rows,
        "prompts": int(rows),
    }


def _rollouts(trainer: PPOTrainer, exp: Experience, step: int, k: int) -> list[dict[str, Any]]:
    tok = trainer.tokenizer
    kl = sequence_kl(exp)
    out = []
    for i in range(min(k, len(exp))):
        prompt = exp.seq[i, : exp.prompt_len][exp.attention_mask[i, : exp.prompt_len] > 0]
        answer = exp.seq[i, exp.prompt_len :][exp.action_mask[i] > 0]
        out.append(
            {
                "step": step,
                "prompt": tok.decode(prompt, skip_special_tokens=True),
                "answer": tok.decode(answer, skip_special_tokens=True),
                "reward": float(exp.scores[i]),
                "kl": float(kl[i]),
                "degenerate": bool(exp.degenerate[i]),
                **({"grades": exp.grades[i]} if exp.grades else {}),
                **(exp.grade_notes[i] if exp.grade_notes else {}),
            }
        )
    return out


def _peak_rss_mib() -> float:
    """This process's peak resident memory (ru_maxrss; Linux reports KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _save_models(
    engine: RLHFEngine,
    cfg: PPOConfig,
    step_dir: Path,
    dist: Dist,
    names: tuple[str, ...] = ("actor", "critic", "actor_ema"),
) -> None:
    """actor/, critic/ (and actor_ema/) as Hugging Face folders (collective at ZeRO-3); of `names` only."""
    tok = engine.tokenizer
    jobs = [
        (
            "actor",
            engine.actor.module,
            cfg.actor.zero_stage,
            "causal_lm",
            engine.actor_config,
            engine.actor_lora,
            engine.actor_dropout_restore,
            engine.actor_path,
            engine.actor_dtype,
        )
    ]
    if engine.critic is not None:
        jobs.append(
            (
                "critic",
                engine.critic.module.model,
                cfg.critic.zero_stage,
                "value",
                engine.critic_config,
                engine.critic_lora,
                engine.critic_dropout_restore,
                engine.critic_path,
                engine.critic_dtype,
            )
        )
    if engine.actor_ema is not None:
        jobs.append(
            (
                "actor_ema",
                engine.actor_ema.module,
                engine.actor_ema.zero_optimization_stage(),
                "causal_lm",
                engine.actor_config,
                engine.actor_lora,
                engine.actor_dropout_restore,
                engine.actor_path,
                engine.actor_dtype,
            )
        )
    for name, module, stage, kind, model_config, lora, restore, src, dtype in jobs:
        if name not in names:
            continue
        state = gathered_state_dict(module, zero_stage=stage, is_main=dist.is_main)
        if dist.is_main:
            import copy

            save_hf_model(
                state,
                config=copy.deepcopy(model_config),
                kind=kind,  # type: ignore[arg-type]
                out=step_dir / name,
                lora=lora,
                dropout_restore=restore,
                tokenizer=tok,
                tokenizer_src=src,
                dtype=torch_dtype(dtype),
                adapter_of=src if kind == "causal_lm" and cfg.actor.only_optimize_lora else None,
            )
    barrier()


class PPOObjective(Objective):
    """Step 3 in the loop shell: actor, critic, reference, reward model (and EMA) as one RLHFEngine."""

    dir_name, title, data_step, unit = STEP_DIR, TITLE, 3, "prompts"
    record_files = (ROLLOUTS,)

    def __init__(self, config: PPOConfig) -> None:
        super().__init__(config)
        if config.algorithm != "ppo":
            self.title = f"step 3 ({config.algorithm.upper()})"
        self.first: dict[str, Any] = {}  # the first step's metrics (the summary's "before")
        self.last: dict[str, Any] = {}
        self.experiences: list[Experience] = []

    def check(self) -> None:
        self.tokenizer = check(self.config)

    def batch_shape(self, world: int) -> tuple[int, int]:
        return self.config.per_device_generation_batch_size, self.config.generation_batches

    def build(self, loop: Loop) -> dict[str, Any]:
        cfg = self.config
        if (grader := cfg.parsed_grader()) is not None:  # before any model is loaded
            check_items(grader, loop.prepared.train, "training")
            check_items(grader, loop.prepared.eval, "held-out")
            check_runnable(grader)
        self.unsup = None
        if cfg.unsup_coef > 0:
            self.unsup = torch.as_tensor(
                prepare_corpus(cfg.data, self.tokenizer, cfg.data.max_prompt_len + cfg.max_answer_len)
            )
            self.unsup_order = torch.randperm(
                len(self.unsup), generator=torch.Generator().manual_seed(cfg.seed)
            )
        self.engine = RLHFEngine(
            actor_model_name_or_path=cfg.actor_model_name_or_path,
            critic_model_name_or_path=cfg.critic_model_name_or_path,
            tokenizer=self.tokenizer,
            num_total_iters=loop.total * cfg.optimizer_steps_per_ppo_step(),
            args=cfg,
            reward_model_name_or_path=cfg.reward_path,
        )
        self.trainer = PPOTrainer(engine=self.engine, args=cfg)
        return {
            "engines": self.engine.init_counts,
            "algorithm": cfg.algorithm,
            "samples_per_prompt": cfg.samples_per_prompt,
        }

    def engines(self) -> dict[str, Any]:
        engines = {"actor": self.engine.actor}
        if self.engine.critic is not None:
            engines["critic"] = self.engine.critic
        return engines

    def checkpoint_state(self) -> dict[str, Any]:
        return {"first": self.first}

    def checkpoint_extra(self) -> dict[str, Any] | None:
        ema = self.engine.actor_ema
        assert self.loop is not None
        return (
            gathered_state_dict(
                ema.module, zero_stage=ema.zero_optimization_stage(), is_main=self.loop.dist.is_main
            )
            if ema is not None
            else None
        )

    def restore(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        assert self.loop is not None
        self.first = state["first"]
        if (ema := self.engine.actor_ema) is not None:
            load_full_state(
                ema.module, extra, zero_stage=ema.zero_optimization_stage(), is_main=self.loop.dist.is_main
            )

    def train_step(self, step: int, batches: list[list[Row]]) -> dict[str, Any]:
        assert self.loop is not None
        cfg, trainer, engine, records = self.config, self.trainer, self.engine, self.loop.records
        dist, world = self.loop.dist, self.loop.dist.world_size
        gen_bs = cfg.per_device_generation_batch_size
        t0 = time.monotonic()
        experiences, gen_s, score_s = [], 0.0, 0.0
        scores: list[float] = []
        acc, train_acc = _Accumulator(), _Accumulator()  # experience metrics per answer, training per update
        for rows in batches:
            exp = trainer.generate_experience(collate_prompts(rows, trainer.pad_id), items=row_items(rows))
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
        minis_per_step = (
            cfg.ppo_epochs * cfg.generation_batches * math.ceil(gen_bs * cfg.samples_per_prompt / mb)
        )
        m = 0
        for _ in range(cfg.ppo_epochs):
            for exp in experiences:
                for mini in exp.split(mb):
                    if self.unsup is not None:
                        # the corpus in a seeded order, each rank its own rows, continuing across steps
                        start = ((step * minis_per_step + m) * world + dist.rank) * mb
                        take = self.unsup_order[[(start + i) % len(self.unsup) for i in range(mb)]]
                        *_, lm_loss = trainer.train_rlhf_with_unsupervised(mini, self.unsup[take])
                        unsup_losses.append(float(lm_loss))
                    else:
                        trainer.train_rlhf(mini)
                    train_acc.add(trainer.last_metrics, len(mini))
                    m += 1
        train_s = time.monotonic() - t1
        means = {**acc.reduce(dist.device), **train_acc.reduce(dist.device)}
        reward_mean, reward_std = _score_stats(scores, dist.device)
        gen_tokens = all_reduce_sum(
            [float(sum(e.answer_lengths.sum() for e in experiences)), gen_s], dist.device
        )
        unsup_loss = (
            all_reduce_sum([sum(unsup_losses), len(unsup_losses)], dist.device)
            if unsup_losses
            else [0.0, 0.0]
        )
        seconds = time.monotonic() - t0
        last = {
            "reward_mean": reward_mean,
            "reward_std": reward_std,
            "kl_to_ref": means["kl_to_ref"],
            "loss": means["actor_loss"],
            "actor_loss": means["actor_loss"],
            "critic_loss": means.get("critic_loss"),
            "unsup_loss": unsup_loss[0] / unsup_loss[1] if unsup_loss[1] else None,
            "clip_frac": means["clip_frac"],
            "value_clip_frac": means.get("value_clip_frac"),
            "answer_len": means["answer_len"],
            "degenerate_rate": means["degenerate_rate"],
            "gen_s": gen_s,
            "score_s": score_s,
            "train_s": train_s,
            "other_s": seconds - gen_s - score_s - train_s,
            "samples_per_s": self.loop.global_batch / seconds,
            "tokens_per_s": gen_tokens[0] / max(gen_tokens[1] / world, 1e-9),
            "tokens": int(gen_tokens[0]),  # answer tokens generated (and trained on) this step
        }
        for key in means:  # grpo/rloo: kl_loss, filtered_rate; a grader: grader_<part>
            if key in ("kl_loss", "filtered_rate") or key.startswith("grader_"):
                last[key] = means[key]
        if torch.cuda.is_available():
            last["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.last, self.experiences = last, experiences
        if not self.first:
            self.first = dict(last)
        critic_lr = engine.critic.get_lr()[0] if engine.critic is not None else None
        return {"lr": engine.actor.get_lr()[0], "critic_lr": critic_lr, **last}

    def after_step(self, step: int) -> None:
        assert self.loop is not None
        if self.loop.dist.is_main and self.config.rollouts_per_step:
            self.loop.records.rollouts(
                ROLLOUTS,
                _rollouts(self.trainer, self.experiences[0], step, self.config.rollouts_per_step),
                step,
            )
        self.experiences = []

    def evaluate(self, *, final: bool, sample: bool = False) -> list[Evaluation]:
        assert self.loop is not None
        cfg = self.config
        whose = [("actor", False)] + (
            [("EMA actor", True)] if final and self.engine.actor_ema is not None else []
        )
        return [
            (
                who,
                evaluate(
                    self.trainer,
                    self.loop.prepared.eval,
                    max_rows=cfg.eval_max_rows,
                    batch_size=cfg.per_device_generation_batch_size,
                    dist=self.loop.dist,
                    seed=cfg.seed,
                    use_ema=use_ema,
                ),
            )
            for who, use_ema in whose
        ]

    def save(self) -> str:
        assert self.loop is not None
        _save_models(self.engine, self.config, self.loop.step_dir, self.loop.dist)
        return str(self.loop.step_dir / "actor")

    def export(self, out: Path) -> Path | None:
        assert self.loop is not None
        _save_models(self.engine, self.config, out, self.loop.dist, names=("actor",))
        return out / "actor"

    def summarize(self, before: dict[str, Any], after: list[Evaluation]) -> dict[str, Any]:
        assert self.loop is not None
        first, last = self.first, self.last
        results = dict(after)
        eval_after, eval_ema = results["actor"], results.get("EMA actor")
        return {
            "ema_model_path": str(self.loop.step_dir / "actor_ema") if eval_ema else None,
            "reward_mean_first": first.get("reward_mean"),
            "reward_mean_last": last.get("reward_mean", first.get("reward_mean")),
            "kl_to_ref_last": last.get("kl_to_ref", first.get("kl_to_ref")),
            "eval_reward_before": before["reward_mean"],
            "eval_reward_after": eval_after["reward_mean"],
            "eval_kl_to_ref_after": eval_after["kl_to_ref"],
            "eval_answer_len_after": eval_after["answer_len"],
            "ema_eval_reward": eval_ema["reward_mean"] if eval_ema else None,
            "ema_eval_kl_to_ref": eval_ema["kl_to_ref"] if eval_ema else None,
            "engines": self.engine.init_counts,
            "algorithm": self.config.algorithm,
            "peak_rss_mib": _peak_rss_mib(),
        }


def run(config: PPOConfig) -> dict[str, Any]:
    return run_objective(PPOObjective(config))
