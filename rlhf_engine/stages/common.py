"""What every step's loop uses: the seeded global-batch data order (1 process with gradient
accumulation sees what 2 processes see), rows shared among ranks for evaluation, sums over ranks,
and the option fingerprints that decide whether a checkpoint or a finished step may be reused."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_engine.data.tokenize import TokenizedSplit
from rlhf_engine.runtime.distributed import Dist
from rlhf_engine.stages.records import SUMMARY, is_finished

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


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


def micro_batch_rows(
    order: list[int], step_in_epoch: int, *, micro: int, accum: int, world: int, rank: int, index: int
) -> list[int]:
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


def eval_batches(
    split: TokenizedSplit,
    collate: Callable[[list[dict[str, Any]], int], Batch],
    pad_id: int,
    *,
    batch_size: int,
    dist: Dist,
    max_rows: int,
) -> list[Batch]:
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


RUN_ONLY_OPTIONS = (
    "output_dir",
    "resume",
    "overwrite",
    "eval_interval",
    "eval_max_rows",
    "checkpoint_interval",
    "keep_checkpoints",
    "rollouts_per_step",
    "tracking",
)


def fingerprint_of(config: Any, world_size: int) -> dict[str, Any]:
    """The options a checkpoint or a finished step is only valid for (others would not continue it)."""
    d = asdict(config)
    for k in RUN_ONLY_OPTIONS:
        d.pop(k, None)
    d["world_size"] = world_size
    return d


_ABSENT = object()


def option_defaults(config: Any) -> dict[str, Any]:
    """Each option's default (nested sections as dicts): what an option added after a run was recorded
    stands for in that run's record."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = option_defaults(value)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def changed_options(saved: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The options whose value differs between a record and now; an option the record does not have (a
    newer version added it) differs only when it is not at its default — so an upgrade does not make
    every finished step and checkpoint stale."""

    def differs(old: Any, new: Any, default: Any) -> bool:
        if isinstance(old, dict) and isinstance(new, dict):
            return any(
                differs(
                    old.get(k, _ABSENT),
                    new.get(k, _ABSENT),
                    default.get(k, _ABSENT) if isinstance(default, dict) else _ABSENT,
                )
                for k in set(old) | set(new)
            )
        if old is _ABSENT:
            return default is _ABSENT or new != default
        return bool(old != new)

    return sorted(
        k
        for k in set(saved) | set(now)
        if differs(saved.get(k, _ABSENT), now.get(k, _ABSENT), defaults.get(k, _ABSENT))
    )


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
    changed = changed_options(ran_with, now, option_defaults(config))
    if changed:
        raise ValueError(
            f"{title} already finished in {step_dir} with other options ({', '.join(changed)}); "
            "pass --overwrite to train it again, or choose another output_dir"
        )
    logger.warning("%s already finished in %s; pass --overwrite to train it again", title, step_dir)
    return summary


def check_resumable(
    state: dict[str, Any], fingerprint: dict[str, Any], folder: Path, defaults: dict[str, Any] | None = None
) -> None:
    saved = state.get("fingerprint", {})
    changed = changed_options(saved, fingerprint, defaults or {})
    if changed:
        raise ValueError(
            f"the checkpoint in {folder} was made with other options ({', '.join(changed)}); rerun with the "
            "same options to resume, or pass --no-resume to start the step afresh"
        )


def to_device(batch: Batch, device: str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}
