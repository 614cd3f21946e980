"""Step 1 and 2 losses, checked by hand-worked arithmetic."""

from __future__ import annotations

import math

import torch

from rlhf_engine.algorithms.losses import lm_loss, lm_nll, pairwise_loss
from rlhf_engine.models.value import last_token_index, sequence_scores


def test_lm_nll_scores_only_labelled_next_tokens() -> None:
    # vocab 2; uniform logits → every scored token costs log 2
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[-100, -100, 1, 0]])  # prompt of 2 tokens, answer tokens at 2 and 3
    total, count = lm_nll(logits, labels)
    assert count == 2  # positions 1→2 and 2→3; position 0→1 is prompt
    assert math.isclose(float(total), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(float(lm_loss(logits, labels)), math.log(2), rel_tol=1e-6)


def test_lm_nll_uses_the_previous_positions_logits() -> None:
    # position 0 predicts token 1 with probability σ(3) ≈ 0.9526 → NLL = log(1 + e^-3) ≈ 0.04859
    logits = torch.tensor([[[0.0, 3.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1]])
    total, count = lm_nll(logits, labels)
    assert count == 1 and math.isclose(float(total), math.log1p(math.exp(-3)), rel_tol=1e-5)


def test_masked_tokens_do_not_change_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [-100, -100, 1, 2, 6]])
    changed = logits.clone()
    changed[0, 3:] = 100.0  # logits at positions whose next label is masked
    assert torch.allclose(lm_loss(logits, labels), lm_loss(changed, labels))


def test_pairwise_loss_values() -> None:
    # tie → log 2; chosen ahead by 2 → log(1 + e^-2) ≈ 0.1269; behind by 2 → log(1 + e^2) ≈ 2.1269
    assert math.isclose(
        float(pairwise_loss(torch.tensor([0.0]), torch.tensor([0.0]))), math.log(2), rel_tol=1e-6
    )
    assert math.isclose(
        float(pairwise_loss(torch.tensor([2.0]), torch.tensor([0.0]))), math.log1p(math.exp(-2)), rel_tol=1e-6
    )
    both = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert math.isclose(float(both), (math.log1p(math.exp(-2)) + math.log1p(math.exp(2))) / 2, rel_tol=1e-6)


def test_scores_are_taken_at_the_last_real_token_for_either_padding() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [5.0, 6.0, 7.0, 8.0]])
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_index(right).tolist() == [2, 3]
    assert sequence_scores(values, right).tolist() == [3.0, 8.0]
    assert sequence_scores(values, left).tolist() == [9.0, 8.0]
