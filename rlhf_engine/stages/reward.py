"""Step 2: reward model — a scalar head on a causal-LM backbone, pairwise loss on (chosen, rejected).

Evaluation scores pairs exactly as step 3 scores answers (`sequence_scores`: the value at the last
real token) and reports accuracy, the mean chosen and rejected scores and the score-gap distribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlhf_engine.algorithms.losses import pairwise_loss
from rlhf_engine.config.train import RewardConfig
from rlhf_engine.data.collate import collate_pairs
from rlhf_engine.models.value import ValueModel, sequence_scores
from rlhf_engine.runtime.distributed import Dist
from rlhf_engine.stages import phase
from rlhf_engine.stages.common import Batch
from rlhf_engine.stages.supervised import StepSpec, check_inputs, run_step

STEP_DIR = "step2_reward"


def pair_scores(engine: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen scores, rejected scores), each (B,), from a collate_pairs batch of 2B rows."""
    values = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (2B, T)
    scores = sequence_scores(values, batch["attention_mask"])  # (2B,)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


def _loss(engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    chosen, rejected = pair_scores(engine, batch)
    c, r = chosen.detach(), rejected.detach()
    metrics = {
        "accuracy": float((c > r).float().mean()),
        "chosen_score": float(c.mean()),
        "rejected_score": float(r.mean()),
    }
    return pairwise_loss(chosen, rejected), metrics


def _evaluate(engine: Any, batches: list[Batch], dist: Dist) -> dict[str, Any]:
    import torch.distributed as tdist

    pairs: list[tuple[float, float]] = []
    for b in batches:
        phase.tick()
        chosen, rejected = pair_scores(engine, b)
        keep = b["weight"] > 0
        pairs += list(zip(chosen[keep].tolist(), rejected[keep].tolist(), strict=True))
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        gathered: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(gathered, pairs)
        pairs = [p for part in gathered for p in part]
    c = np.array([p[0] for p in pairs])
    r = np.array([p[1] for p in pairs])
    gap = c - r
    q = np.percentile(gap, [5, 25, 50, 75, 95]).tolist() if len(gap) else [float("nan")] * 5
    return {
        "accuracy": float((gap > 0).mean()) if len(gap) else float("nan"),
        "chosen_score_mean": float(c.mean()) if len(c) else float("nan"),
        "rejected_score_mean": float(r.mean()) if len(r) else float("nan"),
        "score_gap_mean": float(gap.mean()) if len(gap) else float("nan"),
        "score_gap_std": float(gap.std()) if len(gap) else float("nan"),
        "score_gap_percentiles": dict(zip(("p5", "p25", "p50", "p75", "p95"), q, strict=True)),
        "pairs": len(pairs),
    }


def _summarize(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "eval_accuracy_before": before["accuracy"],
        "eval_accuracy": after["accuracy"],
        "eval_chosen_score_mean": after["chosen_score_mean"],
        "eval_rejected_score_mean": after["rejected_score_mean"],
        "eval_score_gap_mean": after["score_gap_mean"],
        "eval_score_gap_std": after["score_gap_std"],
        "eval_score_gap_percentiles": after["score_gap_percentiles"],
        "eval_pairs": after["pairs"],
    }


SPEC = StepSpec(
    dir_name=STEP_DIR,
    title="step 2 (reward model)",
    data_step=2,
    kind="value",
    collate=collate_pairs,
    wrap=ValueModel,
    loss=_loss,
    evaluate=_evaluate,
    summarize=_summarize,
)


def run(config: RewardConfig) -> dict[str, Any]:
    return run_step(config, SPEC)


def check(config: RewardConfig) -> None:
    """Validate the options, model and tokenizer without starting anything (the launcher's parent)."""
    check_inputs(config, SPEC)
