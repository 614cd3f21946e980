"""PPO for language models, as pure tensor functions (DeepSpeed-Chat's step 3, made explicit).

Shapes: B rows, T answer positions. `logprobs[b, t]` is the log-probability the policy gave the
t-th answer token; `mask[b, t]` is 1 for real answer tokens and 0 for padding after the answer
ended. Hyperparameters come in as floats; nothing here knows a config object or a model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ values·mask (over `dim`, or everything)."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over `dim`, or everything); 0 where nothing is masked in."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, t] | …) from the logits that predict them: logits (B, T, V), tokens (B, T) → (B, T).

    The caller aligns them: `logits[:, t]` must be the prediction *for* `tokens[:, t]`.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 of each row of a (B, T) mask (0 for an all-zero row): (B,)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * positions).argmax(dim=1)


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_ctl: float,
    clip_reward_value: float,
) -> torch.Tensor:
    """Per-token rewards: −kl_ctl·(log π − log π_ref) on every answer token, plus the reward model's
    score clipped to ±clip_reward_value on the last answer token. (B, T), 0 on padding.

    logprobs, ref_logprobs, mask (B, T); scores (B,).
    """
    rewards = -kl_ctl * (logprobs - ref_logprobs) * mask  # (B, T)
    clipped = scores.clamp(-clip_reward_value, clip_reward_value)  # (B,)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += clipped * (mask.sum(1) > 0)
    return rewards


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, computed from the end of each answer backwards.

        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t

    with V and r zero after the answer's last token (the episode ends there). values, rewards, mask
    (B, T) → advantages, returns (B, T).
    """
    values = values * mask
    rewards = rewards * mask
    T = values.shape[1]
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        advantages[:, t] = next_adv
        next_value = values[:, t]
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss, mean over answer tokens: max(−A·ρ, −A·clip(ρ, 1±ε)), ρ = π/π_old.

    Returns (loss, clip fraction = share of tokens where the clipped term was taken).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ½·mean(max((V − R)², (clip(V, V_old ± ε) − R)²)) over answer tokens.

    Returns (loss, clip fraction).
    """
    clipped_values = torch.maximum(
        torch.minimum(values, old_values + cliprange_value), old_values - cliprange_value
    )
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def mean_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL estimate log π − log π_ref over answer tokens (nats per token)."""
    return masked_mean(logprobs - ref_logprobs, mask)


@torch.no_grad()
def ema_update(ema_params: Iterable[torch.Tensor], params: Iterable[torch.Tensor], *, beta: float) -> None:
    """In place: ema ← β·ema + (1 − β)·θ, for each pair of tensors."""
    for e, p in zip(ema_params, params, strict=True):
        e.mul_(beta).add_(p.detach().to(e.dtype), alpha=1.0 - beta)
