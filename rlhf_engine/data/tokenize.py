"""Tokenisation per step, with every left-out or shortened row counted by reason.

- step 1: prompt + chosen answer; `prompt_len` marks where the loss starts (loss on the answer only).
- step 2: (prompt + chosen, prompt + rejected) pairs.
- step 3: prompts (left-padded by the collator for generation) and each row's `item` (its other
  fields, as UTF-8 JSON bytes: what graders read).
- corpus: plain text, concatenated and cut into fixed-size blocks (the pretraining mix).

Sequences are stored ragged (one flat int32 array + offsets) so a tokenised split can be cached as a
plain `.npz` (no pickle) and loaded back without re-tokenising.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_engine.data.formatter import encode_answer, encode_prompt
from rlhf_engine.data.types import Sample


class Ragged:
    """A list of int sequences as one flat array plus offsets."""

    def __init__(self, values: np.ndarray, offsets: np.ndarray) -> None:
        self.values = values
        self.offsets = offsets

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> Ragged:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass
class TokenizedSplit:
    """Columns of one split: ragged token columns and per-row int columns, all of equal length."""

    step: int
    columns: dict[str, Ragged | np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        if not self.columns:
            return 0
        return len(next(iter(self.columns.values())))

    def row(self, i: int) -> dict[str, Any]:
        return {k: (v[i] if isinstance(v, Ragged) else int(v[i])) for k, v in self.columns.items()}

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {"__step": np.array([self.step])}
        for k, v in self.columns.items():
            if isinstance(v, Ragged):
                arrays[f"{k}.values"], arrays[f"{k}.offsets"] = v.values, v.offsets
            else:
                arrays[k] = v
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> TokenizedSplit:
        with np.load(path, allow_pickle=False) as z:
            step = int(z["__step"][0])
            cols: dict[str, Ragged | np.ndarray] = {}
            for k in z.files:
                if k == "__step" or k.endswith(".offsets"):
                    continue
                if k.endswith(".values"):
                    name = k[: -len(".values")]
                    cols[name] = Ragged(z[k], z[f"{name}.offsets"])
                else:
                    cols[k] = z[k]
        return cls(step, cols)


@dataclass
class TokenStats:
    """What happened to one dataset's rows in one step and split."""

    rows: int = 0
    kept: int = 0
    filtered: dict[str, int] = field(default_factory=dict)  # left out, by reason
    truncated: int = 0  # kept, with the answer cut to fit
    lengths: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        lens = self.lengths
        return {
            "rows": self.rows,
            "kept": self.kept,
            "filtered": dict(self.filtered),
            "truncated": self.truncated,
            "tokens_min": min(lens) if lens else None,
            "tokens_median": statistics.median(lens) if lens else None,
            "tokens_max": max(lens) if lens else None,
        }


def tokenize_rows(
    step: int,
    rows: list[Sample],
    tokenizer: Any,
    *,
    max_seq_len: int,
    max_prompt_len: int,
    on_progress: Callable[[], None] | None = None,
) -> tuple[list[tuple[Any, ...]], TokenStats]:
    """Tokenise one dataset's rows for `step`. Returns one tuple per kept row and the stats;
    `on_progress()` is called every 256 rows (headway, for whoever watches a long tokenisation).

    step 1 → (ids, prompt_len, spans: the earlier assistant turns that train); step 2 → (chosen_ids,
    rejected_ids, prompt_len); step 3 → (prompt_ids, item).
    """
    stats = TokenStats(rows=len(rows))
    filtered: Counter[str] = Counter()
    out: list[tuple[Any, ...]] = []
    for i, s in enumerate(rows):
        if on_progress is not None and i % 256 == 0:
            on_progress()
        tools = s.tools or None
        prompt = encode_prompt(s.conversation, tokenizer, tools)
        if step == 3:
            if len(prompt) > max_prompt_len:
                filtered["prompt_too_long"] += 1
                continue
            out.append((prompt, encode_item(s.item)))
            stats.lengths.append(len(prompt))
            continue
        if len(prompt) >= max_seq_len:
            filtered["prompt_too_long"] += 1
            continue
        room = max_seq_len - len(prompt)
        chosen = encode_answer(s.conversation, s.answer, tokenizer, tools)
        if step == 1:
            stats.truncated += len(chosen) > room
            ids = prompt + chosen[:room]
            spans = _earlier_spans(s, ids, tokenizer)
            if spans is None:  # the template renders an earlier turn differently in context
                filtered["turns_not_prefix"] += 1
                continue
            out.append((ids, len(prompt) if s.answer_trained else len(ids), spans))
            stats.lengths.append(len(ids))
            continue
        assert s.rejected is not None, "step 2 rows come from preference datasets"
        rejected = encode_answer(s.conversation, s.rejected, tokenizer)
        stats.truncated += len(chosen) > room or len(rejected) > room
        c, r = prompt + chosen[:room], prompt + rejected[:room]
        if c == r:
            filtered["identical_pair"] += 1  # no preference left to learn (the pairwise loss is flat)
            continue
        out.append((c, r, len(prompt)))
        stats.lengths.append(max(len(c), len(r)))
    stats.filtered = dict(filtered)
    stats.kept = len(out)
    return out, stats


def _earlier_spans(s: Sample, ids: list[int], tokenizer: Any) -> list[int] | None:
    """[start, end, start, end, …]: where the earlier assistant turns that train (`Sample.trained`) lie in
    the row's ids — each turn's answer tokens as the formatter encodes them after the conversation up to
    it. None when the template renders the conversation so that a turn is not where it would be alone
    (the row cannot train that turn as written)."""
    out: list[int] = []
    eos = tokenizer.eos_token_id
    tools = s.tools or None
    for k in s.trained:
        head = encode_prompt(s.conversation[:k], tokenizer, tools)
        turn = s.conversation[k]
        answer = encode_answer(
            s.conversation[:k], turn if turn.tool_calls else turn.content, tokenizer, tools
        )
        if answer and answer[-1] == eos and ids[len(head) : len(head) + len(answer)] != answer:
            answer = answer[:-1]  # a template that ends no earlier turn with EOS: that turn trains without it
        end = min(len(head) + len(answer), len(ids))
        if ids[: len(head)] != head or ids[len(head) : end] != answer[: end - len(head)]:
            return None
        if end > len(head):
            out += [len(head), end]
    return out


_COLUMNS = {
    1: ("input_ids", "prompt_len", "spans"),
    2: ("chosen_ids", "rejected_ids", "prompt_len"),
    3: ("prompt_ids", "item"),
}


def encode_item(item: dict[str, Any] | None) -> bytes:
    """A row's item as UTF-8 JSON (a ragged byte column: cached without pickle)."""
    return json.dumps(item or {}, ensure_ascii=False, sort_keys=True).encode()


def decode_item(column: np.ndarray) -> dict[str, Any]:
    """The inverse of `encode_item`, from a row's `item` column."""
    value: dict[str, Any] = json.loads(column.astype(np.uint8).tobytes())
    return value


def to_split(step: int, rows: list[tuple[Any, ...]]) -> TokenizedSplit:
    """Tokenised row tuples → the columnar split."""
    cols: dict[str, Ragged | np.ndarray] = {}
    for j, name in enumerate(_COLUMNS[step]):
        values = [r[j] for r in rows]
        cols[name] = np.asarray(values, dtype=np.int64) if name == "prompt_len" else Ragged.from_lists(values)
    return TokenizedSplit(step, cols)


def tokenize_corpus(texts: list[str], tokenizer: Any, block_size: int) -> np.ndarray:
    """Texts joined with EOS and cut into blocks of `block_size` tokens: (n_blocks, block_size).

    The tail shorter than a block is dropped (DeepSpeed-Chat's `group_texts`).
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if eos is not None:
            ids.append(eos)
    n = len(ids) // block_size
    return np.asarray(ids[: n * block_size], dtype=np.int64).reshape(n, block_size)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that changes token ids: vocabulary/merges, specials, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(
        json.dumps(
            [type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id]
        ).encode()
    )
    return h.hexdigest()
