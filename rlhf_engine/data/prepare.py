"""From a `DataConfig` to each step's tokenised train/eval data, cached by a content hash.

    datasets = load_datasets(config)              # every file read and validated, errors up front
    prepared = prepare_step(config, 1, tokenizer)  # tokenised, cached, with a per-dataset report

The cache key covers the data files' bytes, their weights, the split, the seed, the step, the
tokenizer and the length limits, so any change re-tokenises and nothing stale is ever reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_engine.config.data import DataConfig
from rlhf_engine.data.errors import DataError
from rlhf_engine.data.io import ReadLimits
from rlhf_engine.data.readers import read_dataset
from rlhf_engine.data.split import (
    STEP_NAMES,
    DatasetSlices,
    blend,
    require_rows,
    slice_dataset,
    validation_rows,
)
from rlhf_engine.data.tokenize import (
    TokenizedSplit,
    TokenStats,
    to_split,
    tokenize_corpus,
    tokenize_rows,
    tokenizer_fingerprint,
)
from rlhf_engine.data.types import Dataset
from rlhf_engine.paths import cache_dir

CACHE_VERSION = 4  # 2: answers end at a template's EOS (formatter.encode_answer); 3: step 3's item column;
# 4: step 1's spans (multi-turn rows) and validation datasets (eval_data)


def load_datasets(config: DataConfig, *, names: list[str] | None = None) -> list[Dataset]:
    """Read every dataset of `config.data` (or `names`), failing on the first bad row."""
    limits = ReadLimits(config.max_file_bytes, config.max_line_bytes, config.max_bad_rows)
    return [read_dataset(spec, limits) for spec in (names if names is not None else config.data)]


def slice_all(config: DataConfig, datasets: list[Dataset]) -> list[DatasetSlices]:
    """Each dataset's rows per step; nothing is held out when validation datasets (`eval_data`) are given."""
    held_out = 0.0 if config.eval_data else config.eval_fraction
    return [slice_dataset(d, config.shares, seed=config.seed, eval_fraction=held_out) for d in datasets]


@dataclass
class DatasetReport:
    """One dataset's contribution to one step (what `rlhf data preview` prints)."""

    dataset: str
    format: str
    kind: str
    step: int
    read_filtered: dict[str, int]
    train: dict[str, Any]
    eval: dict[str, Any]


@dataclass
class PreparedStep:
    step: int
    train: TokenizedSplit
    eval: TokenizedSplit
    reports: list[DatasetReport] = field(default_factory=list)

    def report_dicts(self) -> list[dict[str, Any]]:
        return [r.__dict__ for r in self.reports]


def _cache_key(
    config: DataConfig, step: int, datasets: list[Dataset], tokenizer: Any, eval_sets: list[Dataset]
) -> str:
    payload = {
        "version": CACHE_VERSION,
        "step": step,
        "datasets": [[d.fingerprint, config.weight(i)] for i, d in enumerate(datasets)],
        "eval_data": [d.fingerprint for d in eval_sets],
        "split": config.shares,
        "eval_fraction": config.eval_fraction,
        "seed": config.seed,
        "max_seq_len": config.max_seq_len,
        "max_prompt_len": config.max_prompt_len,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _load_cached(path: Path, step: int) -> PreparedStep | None:
    try:
        reports = json.loads((path / "report.json").read_text())
        return PreparedStep(
            step,
            TokenizedSplit.load(path / "train.npz"),
            TokenizedSplit.load(path / "eval.npz"),
            [DatasetReport(**r) for r in reports],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: rebuild it


def _save_cached(path: Path, prepared: PreparedStep) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    prepared.train.save(tmp / "train.npz")
    prepared.eval.save(tmp / "eval.npz")
    (tmp / "report.json").write_text(json.dumps(prepared.report_dicts(), indent=1))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same entry first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_step(
    config: DataConfig,
    step: int,
    tokenizer: Any,
    *,
    datasets: list[Dataset] | None = None,
    use_cache: bool = True,
    require: bool = True,
    on_progress: Callable[[], None] | None = None,
) -> PreparedStep:
    """Tokenised train/eval data of `step` (1, 2 or 3); `on_progress()` is called as rows are tokenised.

    With `require`, a step left without training rows is an error that says why (no preference
    data, a zero share, every prompt too long).
    """
    if step not in STEP_NAMES:
        raise ValueError(f"step must be 1, 2 or 3, got {step}")
    datasets = datasets if datasets is not None else load_datasets(config)
    slices = slice_all(config, datasets)
    if require:
        require_rows(step, slices, config.shares)
    eval_sets = load_datasets(config, names=config.eval_data) if config.eval_data else []
    key = _cache_key(config, step, datasets, tokenizer, eval_sets)
    where = cache_dir("tokenized") / key[:32]
    if use_cache and (cached := _load_cached(where, step)) is not None:
        return cached

    lengths = {"max_seq_len": config.max_seq_len, "max_prompt_len": config.max_prompt_len}
    train_parts, eval_rows, reports = [], [], []
    for d, sl in zip(datasets, slices, strict=True):
        tr, tr_stats = tokenize_rows(step, sl.train[step - 1], tokenizer, **lengths, on_progress=on_progress)
        ev, ev_stats = tokenize_rows(step, sl.eval[step - 1], tokenizer, **lengths, on_progress=on_progress)
        train_parts.append(tr)
        eval_rows += ev
        reports.append(
            DatasetReport(
                d.name, d.format, d.kind, step, dict(d.filtered), tr_stats.summary(), ev_stats.summary()
            )
        )
    for d in eval_sets:  # validation datasets: the whole eval split
        ev, ev_stats = tokenize_rows(
            step, validation_rows(step, d, seed=config.seed), tokenizer, **lengths, on_progress=on_progress
        )
        eval_rows += ev
        none = TokenStats(rows=0).summary()  # it trains nothing
        reports.append(
            DatasetReport(d.name, d.format, d.kind, step, dict(d.filtered), none, ev_stats.summary())
        )
    train = blend(
        train_parts,
        [config.weight(i) for i in range(len(datasets))],
        [d.fingerprint for d in datasets],
        step=step,
        seed=config.seed,
    )
    if require and not train:
        reasons: Counter[str] = Counter()
        for r in reports:
            reasons.update(r.train["filtered"])
        raise DataError(
            f"{STEP_NAMES[step]}: every training row was left out ({dict(reasons)}); raise max_seq_len / "
            "max_prompt_len or shorten the prompts"
        )
    prepared = PreparedStep(step, to_split(step, train), to_split(step, eval_rows), reports)
    if use_cache:
        _save_cached(where, prepared)
    return prepared


def prepare_corpus(config: DataConfig, tokenizer: Any, block_size: int) -> np.ndarray:
    """The `unsup_data` corpus as (n_blocks, block_size) token ids (step 3's pretraining mix)."""
    texts: list[str] = []
    for d in load_datasets(config, names=config.unsup_data):
        if d.kind == "text":
            texts += d.texts or []
        else:  # a conversation dataset works as a corpus too: its prompts and chosen answers
            texts += [s.prompt_text + " " + s.chosen for s in d.rows]
    blocks = tokenize_corpus(texts, tokenizer, block_size)
    if len(blocks) == 0:
        raise DataError(f"unsup_data holds fewer than {block_size} tokens; add text or shorten the block")
    return blocks
