"""DPO/IPO/SimPO/RPO losses and the GRPO/RLOO advantages, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_engine.algorithms.dpo import answer_logps, preference_loss, rpo_loss
from rlhf_engine.algorithms.group import grpo_advantages, informative_groups, kl_k3, rloo_advantages

T = torch.tensor


def test_dpo_is_a_logistic_loss_on_the_reference_corrected_margin() -> None:
    # log π(c) = −10, log π_ref(c) = −12, log π(r) = −14, log π_ref(r) = −13:
    # h = (−10 + 12) − (−14 + 13) = 3; β h = 0.3; −log σ(0.3) = log(1 + e^−0.3) = 0.554355
    out = preference_loss(T([-10.0]), T([-14.0]), T([-12.0]), T([-13.0]), kind="sigmoid", beta=0.1)
    assert out.losses.item() == pytest.approx(0.554355, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((0.2, -0.1))
    m = out.metrics()
    assert m["rewards_margin"] == pytest.approx(0.3) and m["rewards_accuracy"] == 1.0
    # label smoothing ε = 0.1: 0.9·0.554355 + 0.1·log(1 + e^0.3) = 0.498920 + 0.085436
    smoothed = preference_loss(T([-10.0]), T([-14.0]), T([-12.0]), T([-13.0]), beta=0.1, label_smoothing=0.1)
    assert smoothed.losses.item() == pytest.approx(0.584355, abs=1e-6)


def test_dpo_pushes_chosen_up_and_rejected_down() -> None:
    chosen, rejected = T([-10.0], requires_grad=True), T([-14.0], requires_grad=True)
    preference_loss(chosen, rejected, T([-12.0]), T([-13.0]), beta=0.1).losses.sum().backward()
    # d/dc = −β σ(−βh) = −0.1 · 0.425557; d/dr = +0.1 · 0.425557
    assert chosen.grad.item() == pytest.approx(-0.0425557, abs=1e-6)  # type: ignore[union-attr]
    assert rejected.grad.item() == pytest.approx(0.0425557, abs=1e-6)  # type: ignore[union-attr]


def test_ipo_regresses_the_margin_to_one_over_two_beta() -> None:
    # h = 3, 1/(2β) = 5: (3 − 5)² = 4; at h = 5 the loss is 0
    out = preference_loss(
        T([-10.0, -1.0]), T([-14.0, -6.0]), T([-12.0, -1.0]), T([-13.0, -6.0]), kind="ipo", beta=0.1
    )
    assert out.losses.tolist() == pytest.approx([4.0, 25.0])
    exact = preference_loss(T([0.0]), T([-5.0]), T([0.0]), T([0.0]), kind="ipo", beta=0.1)
    assert exact.losses.item() == pytest.approx(0.0)


def test_simpo_needs_no_reference_and_subtracts_a_margin() -> None:
    # per-token means −1.0 and −1.5, β = 2, γ = 0.5: z = 2·0.5 − 0.5 = 0.5; −log σ(0.5) = 0.474077
    out = preference_loss(T([-1.0]), T([-1.5]), kind="simpo", beta=2.0, simpo_gamma=0.5)
    assert out.losses.item() == pytest.approx(0.474077, abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-2.0, -3.0))
    with pytest.raises(ValueError, match="reference"):
        preference_loss(T([-1.0]), T([-1.5]), kind="sigmoid")


def test_answer_logps_sum_or_mean_over_the_answer_and_rpo_adds_the_sft_term() -> None:
    logps = T([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second answer has 2 tokens
    assert answer_logps(logps, mask, mean=False).tolist() == [-6.0, -1.0]
    assert answer_logps(logps, mask, mean=True).tolist() == [-2.0, -0.5]
    assert rpo_loss(T([0.5]), T([2.0]), alpha=0.25).item() == pytest.approx(1.0)


def test_grpo_normalises_within_each_group() -> None:
    # rewards 1, 2, 3, 6: mean 3, deviations −2 −1 0 3, sample variance 14/3, std 2.160247
    adv = grpo_advantages(T([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]]), eps=1e-12)
    s = math.sqrt(14 / 3)
    assert adv[0].tolist() == pytest.approx([-2 / s, -1 / s, 0.0, 3 / s], abs=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all equal: nothing to learn from this prompt
    assert informative_groups(T([[1.0, 2.0], [5.0, 5.0]])).tolist() == [True, False]


def test_rloo_compares_each_answer_with_the_others() -> None:
    # r − mean(others): 1 − 11/3, 2 − 10/3, 3 − 9/3, 6 − 6/3
    adv = rloo_advantages(T([[1.0, 2.0, 3.0, 6.0]]))
    assert adv[0].tolist() == pytest.approx([-8 / 3, -4 / 3, 0.0, 4.0])
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(T([[1.0]]))


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere() -> None:
    # π = log 0.5, π_ref = log 0.25: d = log 0.5; e^d − d − 1 = 0.5 + 0.693147 − 1
    k = kl_k3(torch.log(T([[0.5, 0.3]])), torch.log(T([[0.25, 0.3]])))
    assert k.tolist()[0] == pytest.approx([0.193147, 0.0], abs=1e-6)
