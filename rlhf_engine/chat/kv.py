"""The chat generator's KV storage: the running batch's cache, written in place, and a cache of prompts'
keys and values for reuse.

`BatchLayer` holds one attention layer's keys and values for every running sequence in storage of
(rows, kv heads, columns, head dim) allocated with room to spare: a decoded token is written into
its column (Hugging Face's `DynamicLayer` concatenates, copying the whole cache every token: 19% of
a 32-row SmolLM2-135M decode step on the 2-core CPU), a new sequence is written into a free row,
and a finished one is replaced by the last row (one row copied, not the batch). Rows are left-padded
to the batch's column count; padding columns hold zeros and are masked.

`PrefixCache` keeps the keys and values of recent prompts and of finished replies (prompt and reply
as one entry). A new prompt that starts with the same tokens as one of them (a shared system prompt,
the earlier turns of a conversation) takes those columns and runs only the rest through the model:
the keys and values of a position depend only on the tokens up to it, so the reply is the one a full
prefill gives (up to the last bits of floating point, which may round differently between the two
shapes of computation).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_COLUMNS = 64  # columns added when a layer's storage grows (at least; it doubles)


class BatchLayer(DynamicLayer):
    """One layer's keys/values of the running batch: `keys` / `values` are views of the first `rows`
    rows and `cols` columns of storage that grows by doubling."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.rows = 0
        self.cols = 0

    # --- storage
    def _view(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[: self.rows, :, : self.cols]
        self.values = self._v[: self.rows, :, : self.cols]

    def _realloc(self, rows: int, cols: int, template: torch.Tensor, shift: int = 0) -> None:
        """Storage for at least `rows` × `cols` (capacities double), the filled part kept and moved
        right by `shift` columns (zeros before it)."""
        cur_rows, cur_cols = (self._k.shape[0], self._k.shape[2]) if self._k is not None else (0, 0)
        row_cap = cur_rows if rows <= cur_rows else max(rows, 2 * cur_rows)
        col_cap = cur_cols if cols <= cur_cols else max(cols + MIN_COLUMNS, 2 * cur_cols)
        shape = (row_cap, template.shape[1], col_cap, template.shape[3])
        k, v = template.new_empty(shape), template.new_empty(shape)
        if self._k is not None and self._v is not None and self.rows:
            k[: self.rows, :, :shift].zero_()
            v[: self.rows, :, :shift].zero_()
            k[: self.rows, :, shift : shift + self.cols] = self._k[: self.rows, :, : self.cols]
            v[: self.rows, :, shift : shift + self.cols] = self._v[: self.rows, :, : self.cols]
            self.cols += shift
        self._k, self._v = k, v
        self.is_initialized = True
        self.device = template.device

    # --- what the model calls
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `t` columns to every row (the model's call, once per layer and forward)."""
        t = key_states.shape[-2]
        if self._k is None:
            self.rows = key_states.shape[0]
            self._realloc(self.rows, t, key_states)
        elif self.cols + t > self._k.shape[2]:
            self._realloc(self.rows, self.cols + t, key_states)
        assert self._k is not None and self._v is not None
        self._k[: self.rows, :, self.cols : self.cols + t] = key_states
        self._v[: self.rows, :, self.cols : self.cols + t] = value_states
        self.cols += t
        self._view()
        return self._k[: self.rows, :, : self.cols], self._v[: self.rows, :, : self.cols]

    # --- what the engine calls
    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows (b, H, w, D), right-aligned to the batch's columns (the narrower side is
        left-padded with zeros)."""
        b, w = keys.shape[0], keys.shape[2]
        if self.rows == 0:
            self.cols = 0
        cols = max(w, self.cols)
        shift = cols - self.cols if self.rows else 0
        if self._k is None or self.rows + b > self._k.shape[0] or cols > self._k.shape[2]:
            self._realloc(self.rows + b, cols, keys, shift=shift)
        elif shift:
            assert self._v is not None
            for t in (self._k, self._v):
                t[: self.rows, :, shift:cols] = t[: self.rows, :, : self.cols].clone()
                t[: self.rows, :, :shift].zero_()
            self.cols = cols
        self.cols = cols
        assert self._k is not None and self._v is not None
        lo, hi, pad = self.rows, self.rows + b, cols - w
        self._k[lo:hi, :, :pad].zero_()
        self._v[lo:hi, :, :pad].zero_()
        self._k[lo:hi, :, pad:cols] = keys
        self._v[lo:hi, :, pad:cols] = values
        self.rows = hi
        self._view()

    def move_row(self, src: int, dst: int) -> None:
        assert self._k is not None and self._v is not None
        self._k[dst, :, : self.cols] = self._k[src, :, : self.cols]
        self._v[dst, :, : self.cols] = self._v[src, :, : self.cols]

    def truncate(self, rows: int, lead: int = 0) -> None:
        """Keep the first `rows` rows; drop `lead` padding columns on the left (shared by every row)."""
        self.rows = rows
        if lead and self._k is not None and self._v is not None:
            n = self.cols - lead
            self._k[:rows, :, :n] = self._k[:rows, :, lead : self.cols].clone()
            self._v[:rows, :, :n] = self._v[:rows, :, lead : self.cols].clone()
            self.cols = n
        if self._k is not None:
            self._view()

    @property
    def column_bytes(self) -> int:
        """Bytes of one row's keys and values at one column."""
        if self._k is None:
            return 0
        return 2 * self._k.shape[1] * self._k.shape[3] * self._k.element_size()

    def row(self, i: int, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i's keys and values at the given columns (a copy): (H, len(columns), D)."""
        assert self._k is not None and self._v is not None
        return self._k[i][:, columns].clone(), self._v[i][:, columns].clone()


def batch_cache(config: Any) -> tuple[DynamicCache, list[BatchLayer]]:
    """A cache of `BatchLayer`s, one per decoder layer. Every layer holds every position (sliding-window
    layers included: their window is kept by the attention mask, built from the config's layer types)."""
    n = config.get_text_config(decoder=True).num_hidden_layers
    layers = [BatchLayer() for _ in range(n)]
    cache = DynamicCache()
    cache.layers = list(layers)
    return cache, layers


@dataclass
class Prefix:
    scope: str
    tokens: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (H, len(tokens), D)
    nbytes: int


class PrefixCache:
    """Recent prompts' (and replies') keys and values, least recently used dropped beyond `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, Prefix] = OrderedDict()
        self._ids = 0
        self.hits = 0  # prompt tokens taken from the cache
        self.misses = 0  # prompt tokens run through the model

    def match(self, prompt: list[int], scope: str = "") -> tuple[int, Prefix | None]:
        """(tokens reusable, the entry holding them): the longest common start with any entry of the
        same scope, at most all but the prompt's last token (the model must see one token to give the
        next one's logits)."""
        best, best_key = 0, None
        limit = len(prompt) - 1
        for key, entry in self._entries.items():
            if entry.scope != scope:
                continue
            n = min(len(os.path.commonprefix([entry.tokens[:limit], prompt[:limit]])), limit)
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key]

    def _holder(self, tokens: list[int], scope: str) -> int | None:
        """The key of an entry of the scope that already covers `tokens` (its tokens start with them)."""
        n = len(tokens)
        return next(
            (key for key, e in self._entries.items() if e.scope == scope and e.tokens[:n] == tokens), None
        )

    def wants(self, tokens: list[int], nbytes: int, scope: str = "") -> bool:
        """Whether `add` would keep these tokens (asked before copying their keys and values): they fit,
        and no entry of the scope already covers them."""
        return 0 < nbytes <= self.max_bytes and self._holder(tokens, scope) is None

    def add(self, tokens: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]], scope: str = "") -> None:
        """Keep a prompt's keys and values, unless an entry already covers it; an entry it extends is
        replaced by it."""
        if self.max_bytes <= 0:
            return
        if (held := self._holder(tokens, scope)) is not None:
            self._entries.move_to_end(held)
            return
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        for key, entry in list(self._entries.items()):  # the new prompt continues these
            if entry.scope == scope and tokens[: len(entry.tokens)] == entry.tokens:
                self._drop(key)
        self._ids += 1
        self._entries[self._ids] = Prefix(scope=scope, tokens=list(tokens), kv=kv, nbytes=nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).nbytes

    def __len__(self) -> int:
        return len(self._entries)
