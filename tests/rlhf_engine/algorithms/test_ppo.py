"""PPO's pure functions, each checked by arithmetic worked out in the comments, plus invariances."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_engine.algorithms.ppo import (
    ema_update,
    gae,
    kl_penalized_rewards,
    last_index,
    masked_mean,
    mean_kl,
    policy_loss,
    token_logprobs,
    value_loss,
)

T = torch.tensor


def close(actual: torch.Tensor, expected: object) -> bool:
    return torch.allclose(actual.float(), torch.as_tensor(expected, dtype=torch.float32), atol=1e-5)


def test_masked_mean_ignores_masked_positions() -> None:
    v = T([[1.0, 2.0, 100.0], [4.0, 5.0, 6.0]])
    m = T([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    assert masked_mean(v, m).item() == pytest.approx((1 + 2 + 4 + 5 + 6) / 5)
    assert masked_mean(v, m, dim=1).tolist() == pytest.approx([1.5, 5.0])
    assert masked_mean(v, torch.zeros_like(m)).item() == 0.0


def test_token_logprobs() -> None:
    # two-token vocabulary, logits (0, ln 3) → p = (1/4, 3/4)
    logits = T([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    assert close(token_logprobs(logits, T([[1, 0]])), [[math.log(0.75), math.log(0.25)]])


def test_kl_penalized_rewards() -> None:
    logp = T([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = T([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = T([7.0, -0.5])
    r = kl_penalized_rewards(logp, ref, scores, mask, kl_ctl=0.1, clip_reward_value=5.0)
    # row 0: -0.1·(0.5, 0, -1) = (-0.05, 0, 0.1); the score 7 clipped to 5 lands on the last token
    # row 1: -0.1·(1, 0) = (-0.1, 0); the score -0.5 lands on token 1, the last real one; padding 0
    assert close(r, [[-0.05, 0.0, 5.1], [-0.1, -0.5, 0.0]])


def test_gae_by_hand() -> None:
    values = T([[1.0, 2.0, 3.0]])
    rewards = T([[0.0, 0.0, 1.0]])
    mask = T([[1.0, 1.0, 1.0]])
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.5)
    # t=2: δ = 1 + 0 − 3 = −2, A = −2
    # t=1: δ = 0 + 3 − 2 = 1,  A = 1 + 0.5·(−2) = 0
    # t=0: δ = 0 + 2 − 1 = 1,  A = 1 + 0.5·0 = 1
    assert close(adv, [[1.0, 0.0, -2.0]])
    assert close(ret, [[2.0, 2.0, 1.0]])  # A + V
    # γ = 1, λ = 1: A_t = Σ rewards from t − V_t (Monte Carlo)
    adv, _ = gae(values, rewards, mask, gamma=1.0, lam=1.0)
    assert close(adv, [[0.0, -1.0, -2.0]])


def test_gae_ends_each_answer_at_its_mask() -> None:
    # whatever stands after the answer (values, rewards) must not change anything inside it
    values = T([[1.0, 2.0, 9.0, 9.0]])
    rewards = T([[0.0, 1.0, 5.0, 5.0]])
    mask = T([[1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(values, rewards, mask, gamma=0.9, lam=0.95)
    short_adv, short_ret = gae(values[:, :2], rewards[:, :2], mask[:, :2], gamma=0.9, lam=0.95)
    assert close(adv[:, :2], short_adv)
    assert adv[:, 2:].abs().sum() == 0 and ret[:, 2:].abs().sum() == 0
    # t=1: δ = 1 − 2 = −1; t=0: δ = 0 + 0.9·2 − 1 = 0.8, A = 0.8 + 0.9·0.95·(−1) = −0.055
    assert close(short_adv, [[-0.055, -1.0]])


def test_policy_loss_clips_the_ratio() -> None:
    old = T([[0.0, 0.0]])
    logp = T([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    adv = T([[1.0, -1.0]])
    mask = T([[1.0, 1.0]])
    loss, clipfrac = policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token 0: max(−1.5, −1.2) = −1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == pytest.approx(1.0)
    # inside the trust region nothing is clipped: loss = −mean(A·ρ)
    loss, clipfrac = policy_loss(T([[math.log(1.1)]]), T([[0.0]]), T([[2.0]]), T([[1.0]]), cliprange=0.2)
    assert loss.item() == pytest.approx(-2.2) and clipfrac.item() == 0.0


def test_value_loss_clips_around_the_old_values() -> None:
    values, old, returns, mask = T([[3.0, 1.1]]), T([[1.0, 1.0]]), T([[2.0, 0.0]]), T([[1.0, 1.0]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: V clipped to 1.2; max((3−2)², (1.2−2)²) = max(1, 0.64) = 1 (unclipped taken)
    # token 1: V 1.1 inside [0.8, 1.2]; (1.1)² both ways = 1.21
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.21) / 2)
    assert clipfrac.item() == 0.0
    loss, clipfrac = value_loss(T([[0.0]]), T([[1.0]]), T([[2.0]]), T([[1.0]]), cliprange_value=0.2)
    # V = 0 clipped to 0.8: max(4, 1.44) = 4 → loss 2, nothing clipped; V moving away from R is not rewarded
    assert loss.item() == pytest.approx(2.0) and clipfrac.item() == 0.0


def test_losses_ignore_masked_positions() -> None:
    torch.manual_seed(0)
    a, b, c = torch.randn(3, 2, 5)
    mask = T([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    noisy = (a.clone(), b.clone(), c.clone())
    for x in noisy:
        x[0, 3:] = 1e3
    assert policy_loss(a, b, c, mask, cliprange=0.2)[0] == pytest.approx(
        policy_loss(*noisy, mask, cliprange=0.2)[0]
    )
    assert value_loss(a, b, c, mask, cliprange_value=0.2)[0] == pytest.approx(
        value_loss(*noisy, mask, cliprange_value=0.2)[0]
    )
    assert mean_kl(a, b, mask) == pytest.approx(mean_kl(noisy[0], noisy[1], mask))


def test_split_batch_gradients_equal_the_full_batch_for_equal_token_counts() -> None:
    """Gradient accumulation over two halves (each a token mean) equals the full batch when the halves
    hold the same number of answer tokens — the case the trainer's equal micro-batches produce."""
    torch.manual_seed(1)
    logp = torch.randn(4, 3, requires_grad=True)
    old, adv = torch.randn(4, 3), torch.randn(4, 3)
    mask = torch.ones(4, 3)
    full, _ = policy_loss(logp, old, adv, mask, cliprange=0.2)
    (g_full,) = torch.autograd.grad(full, logp)
    first, second = (
        policy_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], cliprange=0.2)[0]
        for i in (0, 2)
    )
    halves = (first + second) / 2
    (g_split,) = torch.autograd.grad(halves, logp)
    assert torch.allclose(g_full, g_split, atol=1e-6)


def test_vectorised_gae_equals_a_plain_loop() -> None:
    torch.manual_seed(2)
    values, rewards = torch.randn(3, 6), torch.randn(3, 6)
    mask = T([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] + [0.0] * 5])
    adv, ret = gae(values, rewards, mask, gamma=0.99, lam=0.9)
    for b in range(3):
        n = int(mask[b].sum())
        a_next, expect = 0.0, [0.0] * 6
        for t in reversed(range(n)):
            v_next = float(values[b, t + 1]) if t + 1 < n else 0.0
            a_next = float(rewards[b, t]) + 0.99 * v_next - float(values[b, t]) + 0.99 * 0.9 * a_next
            expect[t] = a_next
        assert adv[b].tolist() == pytest.approx(expect, abs=1e-5)
        assert ret[b, :n].tolist() == pytest.approx(
            [expect[t] + float(values[b, t]) for t in range(n)], abs=1e-5
        )


def test_ema_equals_the_closed_form_after_three_steps() -> None:
    beta = 0.9
    ema = [T([0.0])]
    thetas = [T([1.0]), T([2.0]), T([4.0])]
    for th in thetas:
        ema_update(ema, [th], beta=beta)
    # e3 = β³·e0 + (1−β)(β²·θ1 + β·θ2 + θ3) = 0.1·(0.81 + 1.8 + 4) = 0.661
    assert ema[0].item() == pytest.approx(0.661)


def test_last_index() -> None:
    assert last_index(T([[1, 1, 0], [1, 1, 1], [0, 0, 0]])).tolist() == [1, 2, 0]
