"""Step 2, the DPO way (DeepSpeed-Chat's step2_dpo_finetuning): the step-1 model learns from step 2's
chosen and rejected answers directly, against a frozen reference (by default its own starting
weights); no reward model and no step 3. The output is a causal LM — the chat model of the run:

    RUN/step2_dpo/     config.json, *.safetensors, tokenizer; metrics.jsonl, events.jsonl,
                       checkpoints/, summary.json

Losses (`--loss`): sigmoid (DPO, with `--label-smoothing`), ipo, simpo (reference-free,
length-normalised, `--simpo-gamma`); `--rpo-alpha` adds the SFT loss of the chosen answer. Each step
logs the loss, the implicit rewards of the chosen and rejected answers (β·log π/π_ref), their margin
and how often the chosen one wins; evaluation reports the same on held-out pairs, before and after.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf_engine.algorithms.dpo import PreferenceOutput, answer_logps, preference_loss, rpo_loss
from rlhf_engine.algorithms.ppo import token_logprobs
from rlhf_engine.config.train import DPOConfig
from rlhf_engine.data.collate import collate_pairs
from rlhf_engine.models.loading import load_config, resolve_model
from rlhf_engine.runtime.distributed import Dist
from rlhf_engine.runtime.engines import frozen_engine
from rlhf_engine.stages import phase
from rlhf_engine.stages.common import Batch, all_reduce_sum
from rlhf_engine.stages.loop import Loop, run_objective
from rlhf_engine.stages.supervised import StepSpec, SupervisedObjective

STEP_DIR = "step2_dpo"
TITLE = "step 2 (DPO)"


def answer_token_logps(engine: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of each row's answer under `engine` and the answer mask, both
    (2B, T−1) for a collate_pairs batch (position t scores token t+1; prompt and padding masked)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = engine(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logps = token_logprobs(logits[:, :-1].float(), ids[:, 1:])
    positions = torch.arange(1, ids.shape[1], device=ids.device).unsqueeze(0)
    answer = (positions >= batch["prompt_len"].unsqueeze(1)) & (mask[:, 1:] > 0)
    return logps, answer.to(logps.dtype)


class DPOObjective(SupervisedObjective):
    """The trained model as in steps 1 and 2, plus the frozen reference its loss compares against."""

    def __init__(self, config: DPOConfig) -> None:
        spec = StepSpec(
            dir_name=STEP_DIR,
            title=TITLE,
            data_step=2,
            kind="causal_lm",
            collate=collate_pairs,
            wrap=lambda model: model,
            loss=self._loss,
            evaluate=self._evaluate,
            summarize=_summarize,
        )
        super().__init__(config, spec)
        self.config: DPOConfig = config
        self.unit = "pairs"
        self.ref: Any = None

    def check(self) -> None:
        super().check()
        if self.config.reference_model_name_or_path:
            field = "reference_model_name_or_path"
            ref = resolve_model(self.config.reference_model_name_or_path, field=field)
            ref_config = load_config(ref, kind="causal_lm", field=field)
            if ref_config.vocab_size != self.checked.model_config.vocab_size:
                raise ValueError(
                    f"{field}: {ref} has a vocabulary of {ref_config.vocab_size} tokens, the model "
                    f"{self.checked.model_config.vocab_size}; the reference must read the model's "
                    "tokens (leave it empty to use the model itself)"
                )

    def build(self, loop: Loop) -> dict[str, Any]:
        details = super().build(loop)
        cfg = self.config
        if cfg.loss != "simpo":
            ref = (
                resolve_model(cfg.reference_model_name_or_path) if cfg.reference_model_name_or_path else None
            )
            self.ref = frozen_engine(
                ref or self.checked.model_path,
                kind="causal_lm",
                dtype=self.checked.dtype,
                zero_stage=cfg.model.zero_stage,
                offload=cfg.offload_reference_model,
                micro_batch=cfg.per_device_train_batch_size,
                world_size=loop.dist.world_size,
                persistence_threshold=cfg.model.zero_param_persistence_threshold,
            )
        return {
            **details,
            "loss": cfg.loss,
            "beta": cfg.beta,
            "reference": "none"
            if self.ref is None
            else cfg.reference_model_name_or_path or "the model's starting weights",
        }

    def _preferences(self, engine: Any, batch: Batch) -> tuple[PreferenceOutput, torch.Tensor]:
        """The preference loss per pair (B,) and the chosen answers' mean NLL per token (B,)."""
        cfg = self.config
        mean = cfg.loss in ("ipo", "simpo")  # per-token means, as their papers use them; DPO sums
        logps, answer = answer_token_logps(engine, batch)
        seq = answer_logps(logps, answer, mean=mean)
        half = seq.shape[0] // 2
        ref_c = ref_r = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logps, _ = answer_token_logps(self.ref, batch)
                ref_seq = answer_logps(ref_logps, answer, mean=mean)
            ref_c, ref_r = ref_seq[:half], ref_seq[half:]
        out = preference_loss(
            seq[:half],
            seq[half:],
            ref_c,
            ref_r,
            kind=cfg.loss,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            simpo_gamma=cfg.simpo_gamma,
        )
        chosen_nll = -answer_logps(logps[:half], answer[:half], mean=True)
        return out, chosen_nll

    def _loss(self, engine: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        out, chosen_nll = self._preferences(engine, batch)
        losses = (
            rpo_loss(out.losses, chosen_nll, alpha=self.config.rpo_alpha)
            if self.config.rpo_alpha
            else out.losses
        )
        metrics = {k: v for k, v in out.metrics().items() if k != "loss"}
        return losses.mean(), {**metrics, "chosen_nll": float(chosen_nll.detach().mean())}

    def _evaluate(self, engine: Any, batches: list[Batch], dist: Dist) -> dict[str, Any]:
        """Held-out pairs (padding rows weigh 0): the loss, implicit rewards, margin and accuracy."""
        sums = [0.0] * 6  # pairs, loss, chosen reward, rejected reward, wins, chosen NLL
        for b in batches:
            phase.tick()
            out, chosen_nll = self._preferences(engine, b)
            w = b["weight"].to(out.losses.device, out.losses.dtype)
            margin = out.chosen_rewards - out.rejected_rewards
            for i, v in enumerate(
                (
                    w,
                    out.losses * w,
                    out.chosen_rewards * w,
                    out.rejected_rewards * w,
                    (margin > 0).to(w.dtype) * w,
                    chosen_nll * w,
                )
            ):
                sums[i] += float(v.sum())
        n, loss, chosen, rejected, wins, nll = all_reduce_sum(sums, dist.device)
        n = max(n, 1.0)
        return {
            "loss": loss / n,
            "rewards_chosen": chosen / n,
            "rewards_rejected": rejected / n,
            "rewards_margin": (chosen - rejected) / n,
            "rewards_accuracy": wins / n,
            "chosen_nll": nll / n,
            "pairs": int(n),
        }


def _summarize(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "eval_rewards_accuracy_before": before["rewards_accuracy"],
        "eval_rewards_accuracy_after": after["rewards_accuracy"],
        "eval_rewards_margin_after": after["rewards_margin"],
        "eval_chosen_nll_after": after["chosen_nll"],
        "eval_pairs": after["pairs"],
    }


def run(config: DPOConfig) -> dict[str, Any]:
    return run_objective(DPOObjective(config))


def check(config: DPOConfig) -> None:
    """Validate the options, models and tokenizer without starting anything (the launcher's parent)."""
    DPOObjective(config).check()
