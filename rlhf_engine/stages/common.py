"""The training loop steps 1 and 2 share: data order, DeepSpeed engine, metrics, checkpoints, resume.

A step provides what differs (`StepSpec`): how a micro-batch becomes a loss, how to evaluate, what
goes into the summary. Everything else — validation before loading, the global-batch data order
that makes 1 process with gradient accumulation equal 2 processes, periodic checkpoints with RNG,
exact resume, metrics/events/summary, the final save at any ZeRO stage — lives here once.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_engine.config.train import TrainConfig
from rlhf_engine.data.pipeline import prepare_step
from rlhf_engine.data.tokenize import TokenizedSplit
from rlhf_engine.engine import checkpoint, fencing
from rlhf_engine.engine.deepspeed_setup import (
    build_ds_config,
    initialize,
    make_optimizer,
    make_scheduler,
    resolve_dtype,
    torch_dtype,
)
from rlhf_engine.engine.distributed import Dist, barrier, init_distributed
from rlhf_engine.engine.saving import check_saveable, gathered_state_dict, save_hf_model
from rlhf_engine.engine.stopping import StepStopped, StopRequest
from rlhf_engine.models.loading import (
    ModelKind,
    apply_lora,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
    set_dropout,
)
from rlhf_engine.stages.records import SUMMARY, Records, is_finished, tensorboard_dir, wandb_settings

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class StepSpec:
    """What makes step 1 or step 2 itself."""

    dir_name: str  # folder under output_dir (CONTRACTS.md §1)
    title: str
    data_step: int
    kind: ModelKind
    collate: Callable[[list[dict[str, Any]], int], Batch]
    wrap: Callable[[Any], torch.nn.Module]  # the HF model → the module DeepSpeed trains
    loss: Callable[[Any, Batch], tuple[torch.Tensor, dict[str, float]]]  # (engine, batch) → loss, metrics
    evaluate: Callable[[Any, list[Batch], Dist], dict[str, Any]]  # (engine, batches) → eval metrics
    summarize: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]  # (eval before, eval after)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The seeded row order of one epoch (the same on every rank)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n_rows, generator=g).tolist()


def micro_batch_rows(order: list[int], step_in_epoch: int, *, micro: int, accum: int, world: int,
                     rank: int, index: int) -> list[int]:  # fmt: skip
    """Rows of micro-batch `index` of `rank` in an optimizer step.

    The global batch is cut micro-batch by micro-batch, ranks interleaved: micro-batch i of rank r
    is slice (i·world + r). So 1 process × 2 accumulation steps sees exactly the rows that
    2 processes × 1 step see, and both runs compute the same update.
    """
    global_batch = micro * accum * world
    start = step_in_epoch * global_batch + (index * world + rank) * micro
    return order[start : start + micro]


def rank_share(n: int, dist: Dist) -> tuple[list[int], list[float]]:
    """This rank's rows of n (strided) and their weights, padded so every rank has the same count.

    Under ZeRO-3 each forward pass is collective, so a rank with one batch more would wait forever;
    padding rows repeat row 0 with weight 0.
    """
    mine = list(range(dist.rank, n, dist.world_size))
    per_rank = math.ceil(n / dist.world_size) if n else 0
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    return mine + [0] * (per_rank - len(mine)), weights


def eval_batches(split: TokenizedSplit, collate: Callable[[list[dict[str, Any]], int], Batch], pad_id: int, *,
                 batch_size: int, dist: Dist, max_rows: int) -> list[Batch]:  # fmt: skip
    """This rank's evaluation batches (see `rank_share`), with a `weight` column (0 for padding rows)."""
    mine, weights = rank_share(len(split) if not max_rows else min(max_rows, len(split)), dist)
    batches = []
    for i in range(0, len(mine), batch_size):
        rows = [split.row(j) for j in mine[i : i + batch_size]]
        batch = collate(rows, pad_id)
        batch["weight"] = torch.tensor(weights[i : i + batch_size])
        batches.append(batch)
    return batches


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


RUN_ONLY_OPTIONS = ("output_dir", "resume", "overwrite", "eval_interval", "eval_max_rows", "checkpoint_interval",
                    "keep_checkpoints", "rollouts_per_step", "tracking")  # fmt: skip


def fingerprint_of(config: Any, world_size: int) -> dict[str, Any]:
    """The options a checkpoint or a finished step is only valid for (others would not continue it)."""
    d = asdict(config)
    for k in RUN_ONLY_OPTIONS:
        d.pop(k, None)
    d["world_size"] = world_size
    return d


def finished_summary(step_dir: Path, config: Any, title: str) -> dict[str, Any] | None:
    """The summary of a step that already finished with these options (None: it has not finished,
    or --overwrite). Finished with other options → an error naming them."""
    if not is_finished(step_dir) or config.overwrite:
        return None
    summary = dict(json.loads((step_dir / SUMMARY).read_text()))
    ran_with = dict(summary.get("options", {}))
    ran_with.pop("world_size", None)
    now = fingerprint_of(config, 0)
    now.pop("world_size")
    changed = sorted(k for k in set(ran_with) | set(now) if ran_with.get(k) != now.get(k))
    if changed:
        raise ValueError(f"{title} already finished in {step_dir} with other options ({', '.join(changed)}); "
                         "pass --overwrite to train it again, or choose another output_dir")  # fmt: skip
    logger.warning("%s already finished in %s; pass --overwrite to train it again", title, step_dir)
    return summary


def check_resumable(state: dict[str, Any], fingerprint: dict[str, Any], folder: Path) -> None:
    saved = state.get("fingerprint", {})
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        raise ValueError(
            f"the checkpoint in {folder} was made with other options ({', '.join(changed)}); rerun with the "
            "same options to resume, or pass --no-resume to start the step afresh"
        )


def _to_device(batch: Batch, device: str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class Checked:
    """What validation established before any process group, engine or model exists."""

    dtype: str
    model_path: str
    model_config: Any
    tokenizer: Any
    warnings: list[str]


def check_inputs(config: TrainConfig, spec: StepSpec) -> Checked:
    """Everything about the input that can be wrong, checked before anything heavy starts."""
    dtype = resolve_dtype(config.model)
    model_path = resolve_model(config.model_name_or_path)
    model_config = load_config(model_path, kind=spec.kind)
    tokenizer = load_tokenizer(model_path)
    warnings = []
    if tokenizer.pad_token_id is None:  # GPT-2-style tokenizers; attention masks keep padding apart
        tokenizer.pad_token = tokenizer.eos_token
        warnings.append("the tokenizer has no pad token; padding with EOS (attention masks tell them apart)")
    return Checked(dtype, model_path, model_config, tokenizer, warnings)


def run_step(config: TrainConfig, spec: StepSpec) -> dict[str, Any]:
    """Run one training step to completion (or resume it); returns its summary."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would bury the step's own progress
    step_dir = Path(config.output_dir) / spec.dir_name
    if (summary := finished_summary(step_dir, config, spec.title)) is not None:
        return summary
    checked = check_inputs(config, spec)
    dist = init_distributed()
    records = Records(step_dir, enabled=dist.is_main, title=spec.title, tensorboard=tensorboard_dir(config, step_dir),
                      wandb=wandb_settings(config, step_dir))
    try:
        return _run(config, spec, dist, step_dir, records, checked)
    except (StepStopped, fencing.Superseded):  # stopped or superseded: not an error of the step
        raise
    except Exception as e:
        records.event("error", f"{type(e).__name__}: {e}", level="error")
        raise
    finally:
        records.close()


def _run(config: TrainConfig, spec: StepSpec, dist: Dist, step_dir: Path, records: Records,
         checked: Checked) -> dict[str, Any]:  # fmt: skip
    started = time.monotonic()
    set_seed(config.seed)
    dtype, model_path, model_config, tokenizer = (checked.dtype, checked.model_path, checked.model_config,
                                                  checked.tokenizer)  # fmt: skip
    if dist.is_main:
        prepared = prepare_step(config.data, spec.data_step, tokenizer)
    barrier()  # the other ranks read rank 0's tokenisation from the cache
    if not dist.is_main:
        prepared = prepare_step(config.data, spec.data_step, tokenizer)
    micro, accum, world = config.per_device_train_batch_size, config.gradient_accumulation_steps, dist.world_size
    global_batch, how = config.batch_rows(world)
    steps_per_epoch = len(prepared.train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"{how} is more than the {len(prepared.train)} training rows of {spec.title}; lower the "
                         "batch size or add data")  # fmt: skip
    total = config.num_train_epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)

    # --- model, DeepSpeed engine
    ds_config = build_ds_config(config.model, micro_batch=micro, grad_accum=accum, world_size=world,
                                gradient_clipping=config.gradient_clipping, dtype=dtype)  # fmt: skip
    dropout_restore = set_dropout(model_config, config.model.dropout)
    model = load_model(model_path, kind=spec.kind, opts=config.model, ds_config=ds_config, config=model_config)
    lora = apply_lora(model, config.model, kind=spec.kind) if config.model.lora_dim else None
    check_saveable(model, config=model_config, kind=spec.kind, lora=lora)  # before training, not after it
    module = spec.wrap(model)
    optimizer = make_optimizer(module, config.model, lr=config.learning_rate, weight_decay=config.weight_decay,
                               betas=(config.adam_beta1, config.adam_beta2))  # fmt: skip
    scheduler = make_scheduler(optimizer, config.lr_scheduler_type, warmup=config.num_warmup_steps, total=total)
    engine = initialize(module, optimizer, scheduler, ds_config)

    # --- resume, or start afresh
    ckpt_root = step_dir / "checkpoints"
    fingerprint = fingerprint_of(config, world)
    # --overwrite retrains from scratch; otherwise a rerun picks up the latest checkpoint
    done = checkpoint.complete_checkpoints(ckpt_root) if config.resume and not config.overwrite else []
    start_step, eval_before = 0, None
    if done:
        check_resumable(checkpoint.read_state(done[-1][1]), fingerprint, done[-1][1])
        state, _ = checkpoint.load({"model": engine}, done[-1][1], dist=dist)
        start_step, eval_before = state["global_step"], state["eval_before"]
        records.truncate(start_step)
        records.event("step_started", f"{spec.title}: resuming at step {start_step} of {total}",
                      resumed_from=str(done[-1][1]), global_step=start_step, total_steps=total)  # fmt: skip
    else:
        if dist.is_main:
            records.reset()
            shutil.rmtree(ckpt_root, ignore_errors=True)
        barrier()
        records.event("step_started", f"{spec.title}: {total} steps of {global_batch} rows",
                      total_steps=total, global_batch=global_batch, processes=world, dtype=dtype,
                      zero_stage=config.model.zero_stage, train_rows=len(prepared.train),
                      eval_rows=len(prepared.eval), rows_unused_per_epoch=len(prepared.train) % global_batch,
                      data=prepared.report_dicts())  # fmt: skip
    for warning in checked.warnings:
        records.event("warning", warning, level="warning")

    pad_id = tokenizer.pad_token_id
    ev_batches = eval_batches(prepared.eval, spec.collate, pad_id, batch_size=config.per_device_eval_batch_size,
                              dist=dist, max_rows=config.eval_max_rows)  # fmt: skip

    def run_eval(at_step: int) -> dict[str, Any]:
        engine.eval()
        with torch.no_grad():
            result = spec.evaluate(engine, [_to_device(b, dist.device) for b in ev_batches], dist)
        records.event("eval", f"eval at step {at_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                                                      if isinstance(v, float)),
                      global_step=at_step, **result)  # fmt: skip
        return result

    if eval_before is None:
        eval_before = run_eval(0)
    eval_last = eval_before

    # --- train
    stop = StopRequest(step_dir, dist)

    for step in range(start_step, total):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(prepared.train), config.seed, epoch)
        engine.train()
        t0 = time.monotonic()
        sums: dict[str, float] = {}
        tokens = 0.0
        for i in range(accum):
            rows = micro_batch_rows(order, in_epoch, micro=micro, accum=accum, world=world, rank=dist.rank, index=i)
            batch = _to_device(spec.collate([prepared.train.row(j) for j in rows], pad_id), dist.device)
            loss, extra = spec.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            tokens += float(batch["attention_mask"].sum())
            for k, v in {"loss": loss.item(), **extra}.items():
                sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in keys] + [tokens], dist.device)
        seconds = time.monotonic() - t0
        means = {k: reduced[i] / (accum * world) for i, k in enumerate(keys)}
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"{spec.title}: loss became {means['loss']} at step {step + 1}; lower the "
                                     "learning rate or use fp32/bf16")  # fmt: skip
        records.metric(step=step + 1, epoch=round(epoch + (in_epoch + 1) / steps_per_epoch, 4), **means,
                       lr=engine.get_lr()[0], samples_per_s=global_batch / seconds,
                       tokens_per_s=reduced[-1] / seconds, tokens=int(reduced[-1]))  # fmt: skip
        done_steps = step + 1
        if config.eval_interval and done_steps % config.eval_interval == 0 and done_steps < total:
            eval_last = run_eval(done_steps)
        stopping = done_steps < total and stop.requested()
        if done_steps < total and (stopping or (config.checkpoint_interval
                                                and done_steps % config.checkpoint_interval == 0)):  # fmt: skip
            folder = checkpoint.save({"model": engine}, ckpt_root, global_step=done_steps, dist=dist,
                                     keep=config.keep_checkpoints,
                                     state={"total_steps": total, "eval_before": eval_before,
                                            "fingerprint": fingerprint})  # fmt: skip
            records.event("checkpoint_saved", f"checkpoint at step {done_steps}", path=str(folder),
                          global_step=done_steps)  # fmt: skip
            if stopping:
                records.event("step_stopped", f"{spec.title}: stopped at step {done_steps} of {total}; rerun to resume",
                              global_step=done_steps, path=str(folder))  # fmt: skip
                raise StepStopped(done_steps, folder)
    eval_last = run_eval(total)

    # --- save the model (collective at ZeRO-3), then the summary last
    state_dict = gathered_state_dict(engine.module if spec.kind == "causal_lm" else engine.module.model,
                                     zero_stage=config.model.zero_stage, is_main=dist.is_main)  # fmt: skip
    summary: dict[str, Any] = {}
    if dist.is_main:
        save_hf_model(state_dict, config=model_config, kind=spec.kind, out=step_dir, lora=lora,
                      dropout_restore=dropout_restore, tokenizer=tokenizer, tokenizer_src=model_path,
                      dtype=torch_dtype(dtype))  # fmt: skip
        summary = {
            "step": spec.dir_name,
            "model_path": str(step_dir),
            "base_model": config.model_name_or_path,
            "global_steps": total,
            "train_rows": len(prepared.train),
            "eval_rows": len(prepared.eval),
            "processes": world,
            "seconds": round(time.monotonic() - started, 2),
            **spec.summarize(eval_before, eval_last),
            "options": fingerprint,
        }
        records.event("step_finished", f"{spec.title} finished", **summary)
        records.summary(summary)
    barrier()
    return summary

