"""Group-relative reinforcement (GRPO, RLOO) as pure tensor functions: several answers per prompt,
no critic — each answer's advantage is its reward measured against its own group's.

Shapes: N prompts × G answers per prompt; `rewards[n, g]` is the scalar reward of answer g of
prompt n (a reward model's score or a grader's). Token-level use broadcasts an answer's advantage
to its tokens; the clipped policy loss is PPO's (`algorithms/ppo.py`).
"""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (DeepSeekMath): (r − mean of the group) / (std of the group + ε). (N, G) → (N, G).
    The std is the sample standard deviation (n − 1), as TRL computes it; a group whose rewards are
    all equal gets advantages 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (REINFORCE leave-one-out): r_i − mean of the other answers' rewards = G/(G−1)·(r_i − mean).
    (N, G) → (N, G); needs G ≥ 2."""
    g = rewards.shape[1]
    if g < 2:
        raise ValueError("RLOO needs at least 2 answers per prompt (samples_per_prompt ≥ 2)")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - others


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(N,) bool: groups whose rewards are not all equal (an all-equal group has zero advantage
    everywhere and only adds noise; filtering it is optional)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > 0


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate used as a loss term (`--kl-in loss`; Schulman's k3, as in GRPO):
    exp(ref − π) − (ref − π) − 1 ≥ 0, unbiased for KL(π ‖ π_ref) under samples from π. (B, T)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1
