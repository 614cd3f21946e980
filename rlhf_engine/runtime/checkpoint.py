"""Mid-run checkpoints that resume exactly: DeepSpeed engine state + data position + RNG.

DeepSpeed saves model, optimizer and scheduler state but not the random number generators, so
dropout after a resume would differ; each rank's RNG state is saved here (safetensors + JSON, no
pickle). `trainer_state.json` is written last by rank 0: a checkpoint folder without it is
incomplete (killed while saving) and is never resumed from.

    checkpoints/global_step{N}/<engine>/   DeepSpeed's files of each engine (step 3: actor, critic)
    checkpoints/global_step{N}/            rng_state_rank{R}.*, extra.safetensors, trainer_state.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_engine.runtime import fencing
from rlhf_engine.runtime.distributed import Dist, barrier
from rlhf_engine.stages.records import write_json_atomic

logger = logging.getLogger(__name__)

STATE = "trainer_state.json"
_TAG = re.compile(r"global_step(\d+)$")


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    np_state: Any = np.random.get_state()
    kind, keys, pos, has_gauss, cached = np_state
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, plain


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Every random stream (torch CPU and CUDA, Python, NumPy) as it was before the block: side work at a
    checkpoint (writing its chat model builds a model, which draws) cannot make a run resumed from that
    checkpoint differ from one that went straight on."""
    tensors, plain = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(tensors, plain)


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors]
        )
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(global_step, folder) of every complete checkpoint, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _TAG.match(d.name)
        if m and (d / STATE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def save(
    engines: dict[str, Any],
    root: Path,
    *,
    global_step: int,
    state: dict[str, Any],
    dist: Dist,
    keep: int,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collective: every rank saves its shards and RNG; rank 0 writes `extra` (full tensors, e.g. the
    EMA weights), marks the checkpoint complete and prunes old ones."""
    from safetensors.torch import save_file

    folder = root / f"global_step{global_step}"
    if _any_rank(fencing.superseded(), dist):  # every rank agrees, or one would wait in a collective forever
        raise fencing.SupersededError(
            f"a newer attempt owns {root.parent}; checkpoint {global_step} not written"
        )
    if dist.is_main and folder.exists():
        shutil.rmtree(folder)  # an incomplete leftover of a killed save
    barrier()
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder), tag=name)
    tensors, plain = _rng_state()
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / f"rng_state_rank{dist.rank}.safetensors"),
    )
    (folder / f"rng_state_rank{dist.rank}.json").write_text(json.dumps(plain))
    if dist.is_main and extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, str(folder / "extra.safetensors"))
    barrier()
    if dist.is_main:
        write_json_atomic(folder / STATE, {**state, "global_step": global_step})
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder


def _any_rank(flag: bool, dist: Dist) -> bool:
    if dist.world_size == 1:
        return flag
    import torch.distributed as tdist

    t = torch.tensor([1.0 if flag else 0.0], device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def read_state(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / STATE).read_text()))


def load(
    engines: dict[str, Any], folder: Path, *, dist: Dist
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore each engine and this rank's RNG from a complete checkpoint.

    Returns (trainer state, extra tensors — on every rank, for collective restores)."""
    from safetensors.torch import load_file

    state = read_state(folder)
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(
            str(folder), tag=name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the {name} checkpoint in {folder}")
    rng_file = folder / f"rng_state_rank{dist.rank}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text()))
    else:
        logger.warning(
            "no RNG state for rank %d in %s; sampling and dropout will differ from the original run",
            dist.rank,
            folder,
        )
    extra_file = folder / "extra.safetensors"
    return state, (load_file(str(extra_file)) if extra_file.is_file() else {})
