"""Mid-run checkpoints that resume exactly: DeepSpeed engine state + data position + RNG.

DeepSpeed saves model, optimizer and scheduler state but not the random number generators, so
dropout after a resume would differ; each rank's RNG state is saved here (safetensors + JSON, no
pickle). `trainer_state.json` is written last by rank 0: a checkpoint folder without it is
incomplete (killed while saving) and is never resumed from.

    checkpoints/global_step{N}/        DeepSpeed's files, rng_state_rank{R}.*, trainer_state.json
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_engine.engine.distributed import Dist, barrier
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
    plain = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}  # fmt: skip
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in tensors])
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


def save(engine: Any, root: Path, *, global_step: int, state: dict[str, Any], dist: Dist, keep: int) -> Path:
    """Collective: every rank saves its shard and RNG; rank 0 marks it complete and prunes old ones."""
    from safetensors.torch import save_file

    tag = f"global_step{global_step}"
    folder = root / tag
    if dist.is_main and folder.exists():
        shutil.rmtree(folder)  # an incomplete leftover of a killed save
    barrier()
    engine.save_checkpoint(str(root), tag=tag)
    tensors, plain = _rng_state()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"rng_state_rank{dist.rank}.safetensors"))
    (folder / f"rng_state_rank{dist.rank}.json").write_text(json.dumps(plain))
    barrier()
    if dist.is_main:
        write_json_atomic(folder / STATE, {**state, "global_step": global_step})
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder


def read_state(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / STATE).read_text()))


def load(engine: Any, folder: Path, *, dist: Dist) -> dict[str, Any]:
    """Restore engine state and this rank's RNG from a complete checkpoint; returns trainer state."""
    from safetensors.torch import load_file

    state = read_state(folder)
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)  # fmt: skip
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder}")
    rng_file = folder / f"rng_state_rank{dist.rank}.safetensors"
    if rng_file.is_file():
        _set_rng_state(load_file(str(rng_file)), json.loads(rng_file.with_suffix(".json").read_text()))
    else:
        logger.warning("no RNG state for rank %d in %s; dropout will differ from the original run", dist.rank, folder)
    return state
