"""Steps that train one model by a loss on rows of their data — SFT, the reward model (and DPO, which
adds a frozen reference): `StepSpec` says how a micro-batch becomes a loss, how to evaluate and what
the summary says; `SupervisedObjective` runs it in the loop shell (`loop.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_engine.config.train import TrainConfig
from rlhf_engine.models.loading import (
    ModelKind,
    apply_lora,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
    set_dropout,
)
from rlhf_engine.runtime.deepspeed_setup import (
    build_ds_config,
    initialize,
    make_optimizer,
    make_scheduler,
    resolve_dtype,
    torch_dtype,
)
from rlhf_engine.runtime.distributed import Dist
from rlhf_engine.runtime.saving import check_saveable, gathered_state_dict, save_hf_model
from rlhf_engine.stages import loop
from rlhf_engine.stages.common import Batch, all_reduce_sum, eval_batches, to_device
from rlhf_engine.stages.loop import Evaluation, Loop, Objective, Row


@dataclass
class StepSpec:
    """What makes step 1 or step 2 itself."""

    dir_name: str  # folder under output_dir (docs/contracts.md §1)
    title: str
    data_step: int
    kind: ModelKind
    collate: Callable[[list[dict[str, Any]], int], Batch]
    wrap: Callable[[Any], torch.nn.Module]  # the HF model → the module DeepSpeed trains
    loss: Callable[[Any, Batch], tuple[torch.Tensor, dict[str, float]]]  # (engine, batch) → loss, metrics
    evaluate: Callable[[Any, list[Batch], Dist], dict[str, Any]]  # (engine, batches) → eval metrics
    summarize: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]  # (eval before, eval after)


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


class SupervisedObjective(Objective):
    """A step that trains one model on rows of its data by a loss (SFT, the reward model; DPO adds
    a reference): `StepSpec` says how."""

    def __init__(self, config: TrainConfig, spec: StepSpec) -> None:
        super().__init__(config)
        self.spec = spec
        self.dir_name, self.title, self.data_step = spec.dir_name, spec.title, spec.data_step

    def check(self) -> None:
        self.checked = check_inputs(self.config, self.spec)
        self.tokenizer, self.warnings = self.checked.tokenizer, self.checked.warnings

    def batch_shape(self, world: int) -> tuple[int, int]:
        return self.config.per_device_train_batch_size, self.config.gradient_accumulation_steps

    def build(self, loop: Loop) -> dict[str, Any]:
        config, spec, checked = self.config, self.spec, self.checked
        micro, accum = self.batch_shape(loop.dist.world_size)
        ds_config = build_ds_config(
            config.model,
            micro_batch=micro,
            grad_accum=accum,
            world_size=loop.dist.world_size,
            gradient_clipping=config.gradient_clipping,
            dtype=checked.dtype,
        )
        self.dropout_restore = set_dropout(checked.model_config, config.model.dropout)
        model = load_model(
            checked.model_path,
            kind=spec.kind,
            opts=config.model,
            ds_config=ds_config,
            config=checked.model_config,
        )
        self.lora = apply_lora(model, config.model, kind=spec.kind) if config.model.lora_dim else None
        check_saveable(
            model, config=checked.model_config, kind=spec.kind, lora=self.lora
        )  # before training, not after
        module = spec.wrap(model)
        optimizer = make_optimizer(
            module,
            config.model,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
        )
        scheduler = make_scheduler(
            optimizer, config.lr_scheduler_type, warmup=config.num_warmup_steps, total=loop.total
        )
        self.engine = initialize(module, optimizer, scheduler, ds_config)

        def batches(max_rows: int) -> list[Batch]:
            return eval_batches(
                loop.prepared.eval,
                spec.collate,
                self.tokenizer.pad_token_id,
                batch_size=config.per_device_eval_batch_size,
                dist=loop.dist,
                max_rows=max_rows,
            )

        self.eval_batches = batches(config.eval_max_rows)
        # evaluations at eval_interval: the split's first rows (it is shuffled by the seed: a fixed sample)
        sample = min(config.eval_sample_rows, config.eval_max_rows or config.eval_sample_rows)
        self.sample_batches = batches(sample) if sample else self.eval_batches
        return {"dtype": checked.dtype, "zero_stage": config.model.zero_stage}

    def engines(self) -> dict[str, Any]:
        return {"model": self.engine}

    def train_step(self, step: int, batches: list[list[Row]]) -> dict[str, Any]:
        assert self.loop is not None
        engine, device, pad_id = self.engine, self.loop.dist.device, self.tokenizer.pad_token_id
        engine.train()
        t0 = time.monotonic()
        sums: dict[str, float] = {}
        tokens = 0.0
        for rows in batches:
            batch = to_device(self.spec.collate(rows, pad_id), device)
            loss, extra = self.spec.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            tokens += float(batch["attention_mask"].sum())
            for k, v in {"loss": loss.item(), **extra}.items():
                sums[k] = sums.get(k, 0.0) + v
        keys = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in keys] + [tokens], device)
        seconds = time.monotonic() - t0
        means = {k: reduced[i] / (len(batches) * self.loop.dist.world_size) for i, k in enumerate(keys)}
        return {
            **means,
            "lr": engine.get_lr()[0],
            "samples_per_s": self.loop.global_batch / seconds,
            "tokens_per_s": reduced[-1] / seconds,
            "tokens": int(reduced[-1]),
        }

    def evaluate(self, *, final: bool, sample: bool = False) -> list[Evaluation]:
        assert self.loop is not None
        self.engine.eval()
        with torch.no_grad():
            chosen = self.sample_batches if sample else self.eval_batches
            batches = [to_device(b, self.loop.dist.device) for b in chosen]
            return [(None, self.spec.evaluate(self.engine, batches, self.loop.dist))]

    def save(self) -> str:
        assert self.loop is not None
        return str(self._write(self.loop.step_dir))

    def export(self, out: Path) -> Path | None:
        if self.spec.kind != "causal_lm":  # the reward model scores; nobody chats with it
            return None
        return self._write(out)

    def _write(self, step_dir: Path) -> Path:
        assert self.loop is not None
        spec, checked = self.spec, self.checked
        state_dict = gathered_state_dict(
            self.engine.module if spec.kind == "causal_lm" else self.engine.module.model,
            zero_stage=self.config.model.zero_stage,
            is_main=self.loop.dist.is_main,
        )
        if self.loop.dist.is_main:
            save_hf_model(
                state_dict,
                config=checked.model_config,
                kind=spec.kind,
                out=step_dir,
                lora=self.lora,
                dropout_restore=self.dropout_restore,
                tokenizer=self.tokenizer,
                tokenizer_src=checked.model_path,
                dtype=torch_dtype(checked.dtype),
                adapter_of=(
                    checked.model_path
                    if spec.kind == "causal_lm" and self.config.model.only_optimize_lora
                    else None
                ),
            )
        return step_dir

    def summarize(self, before: dict[str, Any], after: list[Evaluation]) -> dict[str, Any]:
        assert self.loop is not None
        return {
            "base_model": self.config.model_name_or_path,
            "train_rows": len(self.loop.prepared.train),
            "eval_rows": len(self.loop.prepared.eval),
            **self.spec.summarize(before, after[0][1]),
        }


def run_step(config: TrainConfig, spec: StepSpec) -> dict[str, Any]:
    """Run step 1 or 2 to completion (or resume it); returns its summary."""
    return loop.run_objective(SupervisedObjective(config, spec))
