"""Reward model and critic: a causal-LM backbone with a scalar head, and the one scoring function.

The model is transformers' `…ForSequenceClassification` with one label, so the saved step-2 folder
loads with `AutoModelForSequenceClassification.from_pretrained` anywhere (trl, OpenRLHF, …), and
back here as the reward model or as step 3's critic. `ValueModel` exposes the head's output at every
position (the critic needs per-token values); `sequence_scores` takes the value at each sequence's
last real token — the *only* way a sequence is scored, in step 2's training and evaluation and in
step 3.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from rlhf_engine.models.loading import value_head


class ValueModel(nn.Module):
    """Per-token scalar values of a sequence-classification model: forward → (B, T) float32."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        value_head(model)  # fail early; not stored: one module must not sit twice in the tree
        params = inspect.signature(model.base_model.forward).parameters
        self._takes_positions = "position_ids" in params

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
        if self._takes_positions:
            # left-padded rows (step 3) count positions from their first real token
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model.base_model(**kwargs)[0]  # (B, T, H)
        return value_head(self.model)(hidden).squeeze(-1).float()  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding: (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(dim=1)  # (B,)


def sequence_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each sequence: its value at the last real token. values (B, T) → (B,)."""
    idx = last_token_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)
