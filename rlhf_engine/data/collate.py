"""Batching tokenised rows into padded tensors, one collator per step.

Steps 1 and 2 pad on the right (training); step 3 pads prompts on the left so that every prompt
ends at the same position and generation appends after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pad(seqs: Sequence[Any], pad_id: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of token ids → (ids, attention_mask), both (B, T_max)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.as_tensor(s, dtype=torch.long)
        if left:
            ids[i, width - len(t) :], mask[i, width - len(t) :] = t, 1
        else:
            ids[i, : len(t)], mask[i, : len(t)] = t, 1
    return ids, mask


def collate_sft(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Step 1: `labels` are the input ids on the tokens that train — the final answer (from `prompt_len`)
    and the earlier assistant turns of a multi-turn row (`spans`) — and -100 elsewhere."""
    ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        labels[i, r["prompt_len"] :] = ids[i, r["prompt_len"] :]
        spans = [int(x) for x in r.get("spans", ())]
        for start, end in zip(spans[::2], spans[1::2], strict=True):
            labels[i, start:end] = ids[i, start:end]
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Step 2: chosen rows first, then rejected rows, in one (2B, T) batch (DeepSpeed-Chat's layout)."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    ids, mask = pad(seqs, pad_id)
    prompt_len = torch.tensor([r["prompt_len"] for r in rows] * 2, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "prompt_len": prompt_len}


def collate_prompts(rows: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Step 3: left-padded prompts."""
    ids, mask = pad([r["prompt_ids"] for r in rows], pad_id, left=True)
    return {"input_ids": ids, "attention_mask": mask}
