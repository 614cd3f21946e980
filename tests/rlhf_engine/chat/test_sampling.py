"""Next-token choice: top-k / top-p filtering by hand-computed cases, greedy, seeded sampling."""

from __future__ import annotations

import math

import torch

from rlhf_engine.chat.sampling import filter_logits, next_token


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0])
    out = filter_logits(logits, top_k=2, top_p=1.0)
    assert out.tolist() == [-math.inf, 4.0, 3.0, -math.inf]


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # probabilities 0.5, 0.3, 0.2: p=0.6 needs the first two (0.5 < 0.6 ≤ 0.8)
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    out = filter_logits(logits, top_k=0, top_p=0.6)
    assert torch.isfinite(out).tolist() == [True, True, False]
    # p=0.5 is reached by the first alone
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=0.5)).tolist() == [True, False, False]
    # the most likely token always stays, however small p is
    assert torch.isfinite(filter_logits(logits, top_k=0, top_p=1e-9)).tolist() == [True, False, False]


def test_temperature_zero_is_argmax_and_ignores_the_generator() -> None:
    logits = torch.tensor([0.1, 2.0, 1.9])
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, temperature=0, top_k=0, top_p=1.0, generator=g) for _ in range(20)} == {1}


def test_same_seed_same_tokens_and_filtered_tokens_never_drawn() -> None:
    logits = torch.arange(50.0) / 10  # the 5 largest: ids 45-49

    def draw(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [next_token(logits, temperature=1.0, top_k=5, top_p=1.0, generator=g) for _ in range(200)]

    a, b = draw(3), draw(3)
    assert a == b
    assert set(a) == {45, 46, 47, 48, 49}
    assert draw(4) != a
