"""Preference optimisation without a reward model, as pure tensor functions: DPO (DeepSpeed-Chat's
step2_dpo, with its label smoothing), IPO, SimPO (reference-free, length-normalised), and RPO's SFT
term on the chosen answer.

Shapes: B preference pairs. `*_logps[b]` is the log-probability a model gives the whole answer of
pair b (the sum over its tokens — or, for IPO and SimPO, the mean per token, as their papers and
TRL use them; the caller passes what the loss wants). Nothing here knows a config or a model.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from rlhf_engine.config.train import PreferenceLoss


@dataclasses.dataclass
class PreferenceOutput:
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,) implicit rewards, detached
    rejected_rewards: torch.Tensor  # (B,)

    def metrics(self) -> dict[str, float]:
        """Per step: the loss, the implicit rewards, their margin and how often chosen beats rejected."""
        margin = self.chosen_rewards - self.rejected_rewards
        return {
            "loss": float(self.losses.detach().mean()),
            "rewards_chosen": float(self.chosen_rewards.mean()),
            "rewards_rejected": float(self.rejected_rewards.mean()),
            "rewards_margin": float(margin.mean()),
            "rewards_accuracy": float((margin > 0).float().mean()),
        }


def _smoothed(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x): the binary cross-entropy of a preference label flipped with
    probability ε (DeepSpeed-Chat's and TRL's `label_smoothing`, "conservative DPO")."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    *,
    kind: PreferenceLoss = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PreferenceOutput:
    """Losses per pair and the implicit rewards.

    h = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))
    sigmoid (DPO):  −(1−ε)·log σ(β·h) − ε·log σ(−β·h);  rewards β·(log π − log π_ref)
    ipo:            (h − 1/(2β))²                        (per-token mean log-probs)
    simpo:          −(1−ε)·log σ(β·(log π(c) − log π(r)) − γ) − ε·log σ(−…)
                    no reference; per-token mean log-probs; rewards β·log π
    """
    if kind == "simpo":
        logits = beta * (chosen_logps - rejected_logps) - simpo_gamma
        losses = _smoothed(logits, label_smoothing)
        return PreferenceOutput(losses, (beta * chosen_logps).detach(), (beta * rejected_logps).detach())
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss {kind}: needs the reference model's log-probs (only simpo is reference-free)")
    chosen_ratio = chosen_logps - ref_chosen_logps  # (B,)
    rejected_ratio = rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = _smoothed(beta * h, label_smoothing)
    elif kind == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss {kind!r}: choose sigmoid, ipo or simpo")
    return PreferenceOutput(losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def answer_logps(token_logps: torch.Tensor, mask: torch.Tensor, *, mean: bool) -> torch.Tensor:
    """Σ (or mean over the answer's tokens) of per-token log-probs: (B, T), mask (B, T) → (B,)."""
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if mean else total


def rpo_loss(losses: torch.Tensor, chosen_nll: torch.Tensor, *, alpha: float) -> torch.Tensor:
    """RPO: the preference loss plus α times the SFT loss (per-token NLL) of the chosen answer. (B,)."""
    return losses + alpha * chosen_nll
