"""Step 1: supervised fine-tuning — language-model loss on the answer tokens only.

Evaluation is loss, perplexity and token accuracy on the held-out rows (token-weighted over every rank),
before, at every `eval_interval` (on `eval_sample_rows` of them) and after; training steps log the
token accuracy of their batches beside the loss (OpenAI's `mean_token_accuracy`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_engine.algorithms.losses import lm_loss, lm_nll, token_hits
from rlhf_engine.config.train import SFTConfig
from rlhf_engine.data.collate import collate_sft
from rlhf_engine.runtime.distributed import Dist
from rlhf_engine.stages import phase
from rlhf_engine.stages.common import Batch, all_reduce_sum
from rlhf_engine.stages.supervised import StepSpec, check_inputs, run_step

STEP_DIR = "step1_sft"


def _loss(engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    logits = engine(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    with torch.no_grad():
        hits, scored = token_hits(logits, batch["labels"])
    return lm_loss(logits, batch["labels"]), {"mean_token_accuracy": float(hits) / max(float(scored), 1.0)}


def _evaluate(engine: Any, batches: list[Batch], dist: Dist) -> dict[str, Any]:
    nll, count, right = 0.0, 0.0, 0.0
    for b in batches:
        phase.tick()
        logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        labels = b["labels"].masked_fill(b["weight"].unsqueeze(1) == 0, -100)  # padding rows add nothing
        total, n = lm_nll(logits, labels)
        nll += float(total)
        count += float(n)
        right += float(token_hits(logits, labels)[0])
    nll, count, right = all_reduce_sum([nll, count, right], dist.device)
    loss = nll / max(count, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "mean_token_accuracy": right / max(count, 1.0),
        "tokens": int(count),
    }


def _summarize(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "eval_perplexity_before": before["perplexity"],
        "eval_perplexity_after": after["perplexity"],
    }


SPEC = StepSpec(
    dir_name=STEP_DIR,
    title="step 1 (SFT)",
    data_step=1,
    kind="causal_lm",
    collate=collate_sft,
    wrap=lambda model: model,
    loss=_loss,
    evaluate=_evaluate,
    summarize=_summarize,
)


def run(config: SFTConfig) -> dict[str, Any]:
    return run_step(config, SPEC)


def check(config: SFTConfig) -> None:
    """Validate the options, model and tokenizer without starting anything (the launcher's parent)."""
    check_inputs(config, SPEC)
