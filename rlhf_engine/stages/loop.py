"""The one training loop every step runs in: a method supplies its models, its batch → loss and its
evaluation; the shell owns everything else, once.

The shell: refusing a finished step (or one finished with other options), validation before any
process group exists, the data (rank 0 tokenises, the others read its cache), the global-batch row
order that makes 1 process with accumulation equal 2 processes, resume from the latest complete
checkpoint (refused when the options changed), periodic checkpoints and keep-last-N, the STOP file
and SIGTERM (checkpoint, then `StepStoppedError`), the eval schedule (before, every `eval_interval`,
after), metrics/events/summary records and the progress line they drive, and the summary written
last (a step is finished only when its summary exists).

A training objective (`Objective`): `check` (inputs, before anything heavy), `batch_shape`, `build`
(models and engines, once the data and the step count are known), `engines` (what a checkpoint
holds), `train_step` (micro-batches of rows → one line of metrics), `evaluate`, `save` and
`summarize`. SFT and the reward model are `supervised.SupervisedObjective`, PPO is
`ppo.PPOObjective`, DPO `dpo.DPOObjective`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_engine.data.prepare import PreparedStep, prepare_step
from rlhf_engine.runtime import checkpoint, fencing, ops
from rlhf_engine.runtime.distributed import Dist, barrier, init_distributed
from rlhf_engine.runtime.stopping import StepStoppedError, StopRequest
from rlhf_engine.stages import phase
from rlhf_engine.stages.common import (
    check_resumable,
    epoch_order,
    fingerprint_of,
    finished_summary,
    micro_batch_rows,
    option_defaults,
    set_seed,
)
from rlhf_engine.stages.records import Records, tensorboard_dir, wandb_settings

Row = dict[str, Any]
Evaluation = tuple[str | None, dict[str, Any]]  # (which model, when a step evaluates several; its results)


@dataclass
class Loop:
    """What the shell knows once the data is ready, handed to the method's `build`."""

    dist: Dist
    step_dir: Path
    records: Records
    prepared: PreparedStep
    total: int  # optimizer steps of the whole run
    steps_per_epoch: int
    global_batch: int  # rows per step, every process together


class Objective(ABC):
    """What makes a step itself. Attributes `dir_name` (its folder, docs/contracts.md §1), `title`,
    `data_step` (which step's data it reads: 1 SFT rows, 2 preference pairs, 3 prompts) and `unit`."""

    dir_name: str
    title: str
    data_step: int
    unit = "rows"
    record_files: tuple[str, ...] = ()  # further per-step .jsonl files (cut back on resume, removed afresh)

    def __init__(self, config: Any) -> None:
        self.config = config
        self.tokenizer: Any = None
        self.warnings: list[str] = []
        self.loop: Loop | None = None

    @abstractmethod
    def check(self) -> None:
        """Validate the inputs before anything heavy starts; sets `tokenizer` (and `warnings`)."""

    @abstractmethod
    def batch_shape(self, world: int) -> tuple[int, int]:
        """(rows per micro-batch, micro-batches per step) of one process."""

    @abstractmethod
    def build(self, loop: Loop) -> dict[str, Any]:
        """Load the models and engines; returns what the `step_started` event should say of them."""

    @abstractmethod
    def engines(self) -> dict[str, Any]:
        """The DeepSpeed engines a checkpoint saves and restores, by name."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Plain values the method needs back on resume (JSON)."""
        return {}

    def checkpoint_extra(self) -> dict[str, Any] | None:
        """Full tensors to keep beside the engines (collective at ZeRO-3)."""
        return None

    def restore(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        """Take back what `checkpoint_state` and `checkpoint_extra` saved."""
        return None

    @abstractmethod
    def train_step(self, step: int, batches: list[list[Row]]) -> dict[str, Any]:
        """One optimizer step (0-based `step`) on this process's micro-batches; returns its metrics line
        (averaged over every process; `loss` is checked to be finite)."""

    def after_step(self, step: int) -> None:
        """After `step` (1-based) trained, before its evaluation and its metrics line: samples, rollouts."""
        return None

    @abstractmethod
    def evaluate(self, *, final: bool, sample: bool = False) -> list[Evaluation]:
        """Held-out evaluation; the first entry is the trained model's (kept for the summary)."""

    @abstractmethod
    def save(self) -> str:
        """Save the trained model(s) under the step folder (collective); returns the model's path."""

    def export(self, out: Path) -> Path | None:
        """Save the chat model trained so far as a Hugging Face folder under `out` (collective): what makes
        a checkpoint a model one can chat with. Returns its folder; None when the step trains no chat
        model (the reward model)."""
        return None

    @abstractmethod
    def summarize(self, before: dict[str, Any], after: list[Evaluation]) -> dict[str, Any]:
        """The method's own fields of the summary."""


def peak_memory() -> dict[str, Any]:
    """This process's peak memory: the CUDA allocator's peak of tensors on a GPU, else the peak resident set
    (ru_maxrss: every byte of the process, libraries included)."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "peak_memory_source": "cuda_max_memory_allocated",
        }
    return {
        "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_memory_source": "ru_maxrss",
    }


def _offloads(config: Any) -> bool:
    """Whether any model of the step offloads its optimizer state (DeepSpeedCPUAdam)."""
    return any(
        (f.name == "offload" and getattr(config, f.name) is True)
        or (dataclasses.is_dataclass(value := getattr(config, f.name)) and _offloads(value))
        for f in dataclasses.fields(config)
    )


def _weight_bytes(config: Any) -> int:
    """Bytes of the weight files of the local models the step loads (its `*model_name_or_path` fields)."""
    total = 0
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name.endswith("model_name_or_path") and value and Path(value).is_dir():
            total += sum(p.stat().st_size for p in Path(value).glob("*.safetensors"))
    return total


def _io_s(nbytes: float) -> float:
    """Seconds to read or write `nbytes` of weights and set them up (a cautious 100 MB/s, plus start-up)."""
    return 5.0 + nbytes / 100e6


CHAT_MODEL = "chat_model"  # a checkpoint's Hugging Face model (the engines' own tags are model, actor, …)


def _export(method: Objective, folder: Path, dist: Dist) -> Path | None:
    """The checkpoint's chat model beside its training state (`folder/chat_model`, pruned with it), written
    into a temporary folder first so a kill mid-write never leaves a half model that looks whole."""
    tmp = folder / ".chat_model.partial"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    with checkpoint.rng_kept():
        written = method.export(tmp)
    barrier()
    if written is None:
        return None
    final = folder / CHAT_MODEL / written.relative_to(tmp)
    if dist.is_main:
        shutil.rmtree(folder / CHAT_MODEL, ignore_errors=True)
        os.replace(tmp, folder / CHAT_MODEL)
    barrier()
    return final


def as_metrics(results: list[Evaluation], prefix: str) -> dict[str, float]:
    """An evaluation's numbers as metric-point fields: `valid_loss` (OpenAI's names) for the model
    trained, `valid_ema_actor_reward_mean` for another model evaluated beside it."""
    out: dict[str, float] = {}
    for who, result in results:
        head = prefix if who in (None, "actor") else f"{prefix}_{who.lower().replace(' ', '_')}"
        for k, v in result.items():
            if isinstance(v, float):  # (counts such as tokens are ints: not metrics)
                out[f"{head}_{k}"] = v
    return out


def run_objective(method: Objective) -> dict[str, Any]:
    """Run a step to completion, or resume it; returns its summary."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-shard bars would bury the step's own progress
    config = method.config
    step_dir = Path(config.output_dir) / method.dir_name
    if (summary := finished_summary(step_dir, config, method.title)) is not None:
        return summary
    method.check()
    # rank 0 reports the phase (the other ranks are in the same phase, or rank 0 waits for them in it)
    with phase.running(step_dir, enabled=int(os.environ.get("RANK", "0")) == 0, title=method.title) as phases:
        names = ops.needed(offload=_offloads(config))
        phases.enter("building_ops", typical_s=ops.typical_s(names))
        ops.load_ops(names)
        dist = init_distributed()
        records = Records(
            step_dir,
            enabled=dist.is_main,
            title=method.title,
            tensorboard=tensorboard_dir(config, step_dir),
            wandb=wandb_settings(config, step_dir),
        )
        phases.progress = records.progress
        try:
            return _loop(method, dist, step_dir, records, phases)
        except (StepStoppedError, fencing.SupersededError):  # stopped or superseded: not an error of the step
            raise
        except Exception as e:
            records.event("error", f"{type(e).__name__}: {e}", level="error")
            raise
        finally:
            records.close()


def _prepare(method: Objective, dist: Dist) -> PreparedStep:
    """Rank 0 tokenises (and caches); the others then read its cache."""
    config = method.config
    prepared = (
        prepare_step(config.data, method.data_step, method.tokenizer, on_progress=phase.tick)
        if dist.is_main
        else None
    )
    barrier()
    if prepared is None:
        prepared = prepare_step(config.data, method.data_step, method.tokenizer)
    return prepared


def _loop(
    method: Objective, dist: Dist, step_dir: Path, records: Records, phases: phase.Phases
) -> dict[str, Any]:
    config, title, world = method.config, method.title, dist.world_size
    started = time.monotonic()
    set_seed(config.seed)
    phases.enter("tokenizing")
    prepared = _prepare(method, dist)
    micro, accum = method.batch_shape(world)
    global_batch, how = config.batch_rows(world)
    steps_per_epoch = len(prepared.train) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{how} is more than the {len(prepared.train)} training {method.unit} of {title}; lower "
            "the batch size or add data"
        )
    total = config.num_train_epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    method.loop = loop = Loop(dist, step_dir, records, prepared, total, steps_per_epoch, global_batch)
    weights = _weight_bytes(config)
    phases.enter("loading_model", typical_s=_io_s(weights))
    details = method.build(loop)
    estimate = float(os.environ.get(phase.ESTIMATE_ENV, "0") or 0) / total or None  # the service's, per step

    # --- resume, or start afresh (--overwrite retrains from scratch)
    ckpt_root = step_dir / "checkpoints"
    fingerprint = fingerprint_of(config, world)
    done = checkpoint.complete_checkpoints(ckpt_root) if config.resume and not config.overwrite else []
    start_step, eval_before = 0, None
    if done:
        folder = done[-1][1]
        check_resumable(checkpoint.read_state(folder), fingerprint, folder, option_defaults(config))
        phases.enter("restoring_checkpoint", typical_s=_io_s(3 * weights), global_step=done[-1][0])
        state, extra = checkpoint.load(method.engines(), folder, dist=dist)
        method.restore(state, extra)
        start_step, eval_before = state["global_step"], state["eval_before"]
        records.truncate(start_step)
        for name in method.record_files:
            records.truncate(start_step, name=name)
        records.event(
            "step_started",
            f"{title}: resuming at step {start_step} of {total}",
            resumed_from=str(folder),
            global_step=start_step,
            total_steps=total,
        )
    else:
        if dist.is_main:
            records.reset()
            for name in method.record_files:
                (step_dir / name).unlink(missing_ok=True)
            shutil.rmtree(ckpt_root, ignore_errors=True)
        barrier()
        records.event(
            "step_started",
            f"{title}: {total} steps of {global_batch} {method.unit}",
            total_steps=total,
            global_batch=global_batch,
            processes=world,
            train_rows=len(prepared.train),
            eval_rows=len(prepared.eval),
            rows_unused_per_epoch=len(prepared.train) % global_batch,
            **details,
            data=prepared.report_dicts(),
        )
    for warning in method.warnings:
        records.event("warning", warning, level="warning")

    def run_eval(at_step: int, *, final: bool = False, sample: bool = False) -> list[Evaluation]:
        phases.enter("evaluating", global_step=at_step, label=f"evaluating at step {at_step}")
        results = method.evaluate(final=final, sample=sample)
        for who, result in results:
            said = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))
            named: dict[str, Any] = {"model": who} if who else {}
            records.event(
                "eval",
                f"eval{f' of the {who}' if who else ''} at step {at_step}: {said}",
                global_step=at_step,
                **named,
                **result,
            )
        return results

    if eval_before is None:
        eval_before = run_eval(0)[0][1]

    # --- train
    stop = StopRequest(step_dir, dist)
    eval_after: list[Evaluation] | None = None
    for step in range(start_step, total):
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = epoch_order(len(prepared.train), config.seed, epoch)
        batches = [
            [
                prepared.train.row(j)
                for j in micro_batch_rows(
                    order, in_epoch, micro=micro, accum=accum, world=world, rank=dist.rank, index=i
                )
            ]
            for i in range(accum)
        ]
        phases.training(step, total, estimate_s=estimate)
        metrics = method.train_step(step, batches)
        loss = metrics.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(
                f"{title}: loss became {loss} at step {step + 1}; lower the learning rate or use fp32/bf16"
            )
        done_steps = step + 1
        method.after_step(done_steps)
        valid: dict[str, float] = {}
        if config.eval_interval and done_steps % config.eval_interval == 0 and done_steps < total:
            valid = as_metrics(run_eval(done_steps, sample=True), "valid")
        if done_steps == total:  # the last step's point carries the evaluation over every held-out row
            eval_after = run_eval(total, final=True)
            valid = as_metrics(eval_after, "full_valid")
        epoch_at = round(epoch + (in_epoch + 1) / steps_per_epoch, 4)
        records.metric(step=done_steps, epoch=epoch_at, **metrics, **valid)
        stopping = done_steps < total and stop.requested()
        interval = config.checkpoint_interval
        if done_steps < total and (stopping or (interval and done_steps % interval == 0)):
            phases.enter(
                "saving_checkpoint",
                typical_s=_io_s(3 * weights),
                global_step=done_steps,
                label=f"saving the checkpoint at step {done_steps}",
            )
            folder = checkpoint.save(
                method.engines(),
                ckpt_root,
                global_step=done_steps,
                dist=dist,
                keep=config.keep_checkpoints,
                extra=method.checkpoint_extra(),
                state={
                    "total_steps": total,
                    "eval_before": eval_before,
                    **method.checkpoint_state(),
                    "fingerprint": fingerprint,
                },
            )
            model = _export(method, folder, dist) if config.checkpoint_models else None
            records.event(
                "checkpoint_saved",
                f"checkpoint at step {done_steps}",
                path=str(folder),
                global_step=done_steps,
                model_path=str(model) if model is not None else None,
            )
            if stopping:
                records.event(
                    "step_stopped",
                    f"{title}: stopped at step {done_steps} of {total}; rerun to resume",
                    global_step=done_steps,
                    path=str(folder),
                )
                raise StepStoppedError(done_steps, folder)
    if eval_after is None:  # nothing was left to train (resumed at the end)
        eval_after = run_eval(total, final=True)

    # --- save the model (collective at ZeRO-3), then the summary last
    phases.enter("saving_model", typical_s=_io_s(weights), global_step=total)
    model_path = method.save()
    summary: dict[str, Any] = {}
    if dist.is_main:
        summary = {
            "step": method.dir_name,
            "model_path": model_path,
            "global_steps": total,
            "processes": world,
            "seconds": round(time.monotonic() - started, 2),
            **peak_memory(),
            **method.summarize(eval_before, eval_after),
            "options": fingerprint,
        }
        records.event(
            "step_finished", f"{title} finished", **{k: v for k, v in summary.items() if k != "options"}
        )
        records.summary(summary)
    barrier()
    return summary
