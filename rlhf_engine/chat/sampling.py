"""Choosing the next token of one sequence from its logits, with that request's own RNG.

Each sequence samples on the CPU from its own `torch.Generator`, so its tokens depend only on its
seed and its logits — not on which other requests share the batch, nor on the device.
"""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """`logits` (V,) with tokens outside the top-k and outside the top-p nucleus set to -inf.

    Top-p keeps the smallest set of most likely tokens whose probability sums to at least `top_p`
    (the most likely token always stays), as transformers' TopPLogitsWarper.
    """
    out = logits.clone()
    if 0 < top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        drop[0] = False
        out[order[drop]] = float("-inf")
    return out


def next_token(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> int:
    """One token id from `logits` (V,): greedy at temperature 0, else sampled with `generator`."""
    logits = logits.float()
    if temperature == 0:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
