"""Losses of steps 1 and 2."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of scored tokens.

    logits (B, T, V), labels (B, T) with -100 where no loss is taken (prompt, padding). Position t
    predicts labels[t + 1]. Returns (sum of NLL, token count), both scalars.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    count = (shift_labels != -100).sum()
    return total, count


def token_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens whose most likely next token is the label, scored tokens): the numerator and denominator
    of OpenAI's `mean_token_accuracy`, over the same tokens as `lm_nll`."""
    shift_labels = labels[:, 1:]
    scored = shift_labels != -100
    hits = (logits[:, :-1].argmax(dim=-1) == shift_labels) & scored
    return hits.sum(), scored.sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over the labelled tokens (step 1: the answer tokens)."""
    total, count = lm_nll(logits, labels)
    return total / count.clamp(min=1)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss: mean of -log σ(r_chosen − r_rejected). chosen, rejected (B,) → scalar.

    0 when chosen scores far above rejected, log 2 when they tie, grows linearly when reversed.
    """
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()
