"""Step 3's prompts share their start: run it through a model once, not once per row.

Chat templates open every prompt alike (SmolLM2's ChatML writes a 24-token default system prompt
before each question: more than half of the bundled prompts' 42 tokens), and a generation batch is
64 of them. `prefix_first` moves each row's padding from the left to just after the shared start —
[shared start][padding][rest of the prompt] — so the start occupies the same columns in every row;
`prefix_cache` runs those columns once (one row) and hands `generate`, the reference model's scoring
pass and the policy's training pass a KV cache that holds them for every row (in training the
broadcast's gradient is the sum over rows: the same gradients as running the start in every row).
Positions come from the attention mask everywhere in this package (`generation.position_ids`), so a
row's tokens keep the positions they had left-padded, and the
padding columns are masked: the answers and log-probs are those of the left-padded batch up to the
last bits of floating point (the shorter passes may round differently).

Not for models with sliding-window layers (their windows count columns, padding included) or when
a forward pass talks to other ranks (ZeRO-3 without a gathered copy: ranks must run the same
passes).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from rlhf_engine.runtime import kv_cache


def has_sliding_layers(config: Any) -> bool:
    """Whether some layer of the model's KV cache is not a plain full-attention one (a sliding window,
    which counts columns; anything else), by the one rule `kv_cache.plain_layers`. A config
    transformers cannot build a cache from counts as one."""
    return not kv_cache.all_plain(config)


def shared_prefix_len(prompts: torch.Tensor, mask: torch.Tensor) -> int:
    """Tokens every left-padded row's prompt starts with, at most all but the shortest prompt's last."""
    if prompts.shape[0] < 2:
        return 0
    lens = mask.long().sum(1)
    shortest = int(lens.min())
    if shortest < 2:
        return 0
    starts = prompts.shape[1] - lens  # (B,) each row's first real column
    index = starts.unsqueeze(1) + torch.arange(shortest - 1, device=prompts.device).unsqueeze(0)
    tokens = prompts.gather(1, index)  # (B, shortest - 1): each row's first tokens
    same = (tokens == tokens[:1]).all(0).long()
    return int(same.cumprod(0).sum())


def prefix_first(
    prompts: torch.Tensor, mask: torch.Tensor, k: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts re-laid as [first k tokens][padding][the rest], same width."""
    B, P = prompts.shape
    lens = mask.long().sum(1)
    cols = torch.arange(P, device=prompts.device).unsqueeze(0)  # (1, P)
    pad = (P - lens).unsqueeze(1)  # (B, 1) padding columns per row
    # target column c takes source column c + pad inside the start, c itself after the padding
    source = torch.where(cols < k, cols + pad, cols)
    in_gap = (cols >= k) & (cols < k + pad)
    out = prompts.gather(1, source.clamp(max=P - 1)).masked_fill(in_gap, pad_id)
    return out, (~in_gap).to(mask.dtype)


def prefix_cache(
    model: Any, prefix: torch.Tensor, rows: int, cache: DynamicCache | None = None
) -> DynamicCache:
    """A KV cache holding `prefix` (k,) for `rows` rows: the model runs it once. `cache`: an empty one to
    fill (e.g. `reserved_cache`'s, with room for what follows); default a plain DynamicCache."""
    from rlhf_engine.runtime.generation import cache_kwarg, forward_params

    one = DynamicCache()
    kwargs: dict[str, Any] = {"input_ids": prefix.unsqueeze(0), cache_kwarg(model): one, "use_cache": True}
    params = forward_params(model)
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    model(**kwargs)
    cache = cache if cache is not None else DynamicCache()
    for i, layer in enumerate(one.layers):
        keys, values = layer.keys, layer.values  # type: ignore[union-attr]
        assert keys is not None and values is not None
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), i)
    return cache
