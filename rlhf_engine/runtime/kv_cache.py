"""A KV cache that reserves room for the whole answer, so a generated token is written in place.

Hugging Face's default `DynamicCache` grows by `torch.cat`: every new token copies the whole cache of
every layer. For step 3's generation (64 prompts × 48 tokens, the bench's 26M-parameter OPT on the
2-core CPU) those copies were 33% of the profiled `generate` time. `reserved_cache` allocates each
full-attention layer's keys and values once, for prompt + `reserve` tokens, and hands attention a
view of the filled part. Tokens and logits are the same: bit for bit in 450 of 450 stress runs, but
once under load a logit differed in the last bits (the BLAS need not round alike from call to call);
tests/rlhf_engine/stages/test_kv_cache.py.

Layers of any other kind (sliding-window, linear-attention, shared-KV …) keep the class Hugging Face
chose for them; if a model has none of the plain kind, `reserved_cache` returns None and `generate`
builds its default cache.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose storage is allocated once with `reserve` spare positions (and grows by
    doubling if a caller goes past them); `keys` / `values` are views of the filled positions."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0

    def _grow(self, keys: torch.Tensor, values: torch.Tensor, need: int) -> None:
        cap = need + self.reserve if self._k is None else max(need, 2 * self._k.shape[-2])
        k = keys.new_empty(*keys.shape[:-2], cap, keys.shape[-1])
        v = values.new_empty(*values.shape[:-2], cap, values.shape[-1])
        if self._n:
            assert self._k is not None and self._v is not None
            k[..., : self._n, :] = self._k[..., : self._n, :]
            v[..., : self._n, :] = self._v[..., : self._n, :]
        self._k, self._v = k, v

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.device = key_states.device
            self.is_initialized = True
        n, t = self._n, key_states.shape[-2]
        if self._k is None or n + t > self._k.shape[-2]:
            self._grow(key_states, value_states, n + t)
        assert self._k is not None and self._v is not None
        self._k[..., n : n + t, :] = key_states
        self._v[..., n : n + t, :] = value_states
        self._n = n + t
        self.keys, self.values = self._k[..., : self._n, :], self._v[..., : self._n, :]
        return self.keys, self.values

    def _adopt(self) -> None:
        """After a parent method replaced keys/values (crop, reorder, batch selection): own them."""
        if self.keys is None or self.values is None or self.keys.numel() == 0:
            self._k = self._v = None
            self._n = 0
            return
        self._k, self._v = self.keys.contiguous(), self.values.contiguous()
        self._n = self._k.shape[-2]
        self.keys, self.values = self._k, self._v

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt()

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None
        self._n = 0


def _default_cache(config: Any) -> DynamicCache | None:
    """The cache transformers builds for `config`, or None when it cannot (or an encoder-decoder)."""
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    try:
        return DynamicCache(config=config)
    except (AttributeError, KeyError, TypeError, ValueError):  # a cache HF builds differently
        return None


def _is_plain(layer: Any) -> bool:
    return type(layer) is DynamicLayer


def plain_layers(config: Any) -> list[bool] | None:
    """Per layer of the KV cache transformers builds for `config`: whether it is a plain full-attention
    layer (`DynamicLayer`: every position kept, appended in order). None when transformers cannot build
    a cache from the config (or it is an encoder-decoder): then no layer counts as plain. The one rule
    for "plain full attention": the reserved cache replaces exactly these layers, and the shared-prompt
    start (runtime/prefix.py) and the chat generator's prompt cache need every layer to be one."""
    cache = _default_cache(config)
    return None if cache is None else [_is_plain(layer) for layer in cache.layers]


def all_plain(config: Any) -> bool:
    """Whether every layer is a plain full-attention one (see `plain_layers`)."""
    kinds = plain_layers(config)
    return kinds is not None and len(kinds) > 0 and all(kinds)


def reserved_cache(model: Any, reserve: int) -> DynamicCache | None:
    """The cache `generate` would build for `model`, its plain full-attention layers (`plain_layers`)
    replaced by ReservedLayer(reserve); None when the model has no such layer (or no config to tell)."""
    cache = _default_cache(getattr(model, "config", None))
    if cache is None:
        return None
    replaced = 0
    for i, layer in enumerate(cache.layers):
        if _is_plain(layer):
            cache.layers[i] = ReservedLayer(reserve)
            replaced += 1
    return cache if replaced else None
