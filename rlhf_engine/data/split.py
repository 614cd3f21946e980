"""DeepSpeed-Chat's `data_split`, done as it should be: each step gets a disjoint, seeded slice of
*every* dataset, proportional to the shares, with evaluation rows held out first.

For each conversation dataset: one seeded permutation of its rows; the first `eval_fraction` become
evaluation rows (unless the source brought its own eval split), the rest training rows; each of the
two is then cut into three contiguous slices by the shares. SFT-only datasets give all their rows to
step 1, prompt-only datasets all theirs to step 3. Blending concatenates the steps' slices of all
datasets (training rows repeated or sampled by the dataset's weight) and shuffles them with the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeVar

from rlhf_engine.data.errors import DataError
from rlhf_engine.data.types import Dataset, Sample

T = TypeVar("T")
STEP_NAMES = {1: "step 1 (SFT)", 2: "step 2 (reward model)", 3: "step 3 (PPO)"}


def bounds(n: int, shares: tuple[float, ...]) -> list[int]:
    """Cut points of `n` rows into len(shares) contiguous slices: [0, b1, b2, n]."""
    out = [0]
    acc = 0.0
    for s in shares[:-1]:
        acc += s
        out.append(min(n, round(acc * n)))
    out.append(n)
    return out


def _rng(seed: int, salt: str) -> random.Random:
    # str seeds are hashed with SHA-512 by `random` (not Python's salted hash): stable across runs
    return random.Random(f"{seed}:{salt}")


@dataclass
class DatasetSlices:
    """The rows one dataset gives each step (index 0 = step 1)."""

    name: str
    kind: str
    train: list[list[Sample]]
    eval: list[list[Sample]]


def slice_dataset(
    ds: Dataset, shares: tuple[float, float, float], *, seed: int, eval_fraction: float
) -> DatasetSlices:
    """Split one conversation dataset between the three steps (see the module docstring)."""
    if ds.kind == "text":
        raise DataError(
            "is plain text; conversation steps need prompts and answers — pass it as unsup_data "
            "(step 3's pretraining mix) instead of data",
            path=ds.name,
        )
    order = list(range(len(ds.rows)))
    _rng(seed, ds.fingerprint).shuffle(order)
    if ds.eval_rows is not None:
        train_idx, eval_rows = order, list(ds.eval_rows)
        _rng(seed, ds.fingerprint + ":eval").shuffle(eval_rows)
    else:
        n_eval = round(len(order) * eval_fraction)
        if eval_fraction > 0 and len(order) >= 2:
            n_eval = max(1, n_eval)
        eval_rows = [ds.rows[i] for i in order[:n_eval]]
        train_idx = order[n_eval:]
    train_rows = [ds.rows[i] for i in train_idx]
    if ds.kind == "sft":  # SFT-only data feeds step 1 only, whatever the shares
        return DatasetSlices(ds.name, ds.kind, [train_rows, [], []], [eval_rows, [], []])
    if ds.kind == "prompt":  # prompts without answers feed step 3 only
        return DatasetSlices(ds.name, ds.kind, [[], [], train_rows], [[], [], eval_rows])
    tb, eb = bounds(len(train_rows), shares), bounds(len(eval_rows), shares)
    return DatasetSlices(
        ds.name,
        ds.kind,
        [train_rows[tb[i] : tb[i + 1]] for i in range(3)],
        [eval_rows[eb[i] : eb[i + 1]] for i in range(3)],
    )


def validation_rows(step: int, ds: Dataset, *, seed: int) -> list[Sample]:
    """A validation dataset's rows that `step` can evaluate on (SFT rows: step 1; prompts: step 3;
    preference pairs: any step), in a seeded order (so a sample of them is its first rows)."""
    if step not in {"sft": (1,), "prompt": (3,), "preference": (1, 2, 3)}.get(ds.kind, ()):
        return []
    rows = list(ds.rows) + list(ds.eval_rows or [])
    _rng(seed, ds.fingerprint + ":eval").shuffle(rows)
    return rows


def apply_weight(rows: list[T], weight: float, *, seed: int, salt: str) -> list[T]:
    """Rows repeated `int(weight)` times plus a seeded sample of the fractional part."""
    whole, frac = int(weight), weight - int(weight)
    out = rows * whole
    if frac > 0:
        out += _rng(seed, salt + ":weight").sample(rows, round(frac * len(rows)))
    return out


def blend(
    per_dataset: list[list[T]], weights: list[float], names: list[str], *, step: int, seed: int
) -> list[T]:
    """One step's training rows from every dataset, each weighted, then shuffled with the seed."""
    out: list[T] = []
    for rows, w, name in zip(per_dataset, weights, names, strict=True):
        out += apply_weight(rows, w, seed=seed, salt=f"{name}:{step}")
    _rng(seed, f"blend:{step}").shuffle(out)
    return out


def require_rows(step: int, slices: list[DatasetSlices], shares: tuple[float, float, float]) -> None:
    """A step that is about to run must have training rows; say why it has none."""
    if any(s.train[step - 1] for s in slices):
        return
    what = STEP_NAMES[step]
    names = ", ".join(s.name for s in slices)
    if step == 1 and not any(s.kind in ("preference", "sft") for s in slices):
        raise DataError(
            f"{what} needs answers to train on, but every dataset in data holds prompts only ({names}); "
            "add an SFT or preference dataset, e.g. bundled:sft"
        )
    if step == 2 and not any(s.kind == "preference" for s in slices):
        raise DataError(
            f"{what} needs preference data (prompt, chosen, rejected), but no dataset in data has it "
            f"({names}); add one, e.g. bundled:preference"
        )
    if step == 3 and not any(s.kind in ("preference", "prompt") for s in slices):
        raise DataError(
            f"{what} needs prompts (a preference or prompt-only dataset), but every dataset in data is "
            f"SFT-only ({names}); add one, e.g. bundled:preference or bundled:questions"
        )
    if shares[step - 1] == 0:
        raise DataError(
            f"data_split gives {what} a zero share, but it needs data; give it a share, e.g. 2,4,4",
            field="data_split",
        )
    raise DataError(f"{what} has no training rows: the datasets are too small for data_split; add rows")
