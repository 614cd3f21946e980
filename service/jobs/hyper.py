"""OpenAI's hyperparameters with OpenAI's meaning, as step options: one owner of the rules.

- `batch_size`: examples per optimiser step, in every method (steps 1-2: rows; step 3: prompts). The
  micro-batch and the accumulation are derived from it (the micro-batch the preset or the step's
  default, or a divisor of it), so `per_device × accumulation × processes = batch_size`.
- `"auto"` picks from the data and the model when neither a preset nor `config` sets the option (and
  the data's rows are known here; otherwise the step's default stays):
  batch_size ≈ 0.2% of the training rows (1 to 256, OpenAI's rule), n_epochs by OpenAI's cookbook rule
  (3, more for small files so at least 100 examples are seen, fewer for large ones, 1 to 25),
  learning_rate_multiplier 1 up to 10M parameters and 1/√(params/10M) above (a 135M model: 0.27×).
- reinforcement: `eval_interval` and `eval_samples` are step 3's evaluation cadence and size;
  `compute_multiplier` scales the answers sampled per prompt (4 × m, at least 2: GRPO's group);
  `reasoning_effort` scales the answer-length budget (low ½, default and medium 1, high 2 ×
  max_answer_len) — a model without a reasoning mode simply gets that budget.
- with a validation file and no `eval_interval`, each step evaluates about ten times on a sample of 64
  validation rows (valid_*), and on every row at the end (full_valid_*).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from service.errors import InvalidRequestError
from service.jobs.estimate import step_default
from service.schemas import DPOHyperparameters, Hyperparameters, ReinforcementHyperparameters

# each hyperparameter → the step options it sets (one of them also set in `config` is refused, naming both)
HP_OPTIONS = {
    "n_epochs": ("num_train_epochs",),
    "batch_size": (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "per_device_generation_batch_size",
        "generation_batches",
    ),
    "learning_rate_multiplier": ("learning_rate", "actor_learning_rate", "critic_learning_rate"),
    "beta": ("beta",),
    "eval_interval": ("eval_interval",),
    "eval_samples": ("eval_max_rows",),
    "compute_multiplier": ("samples_per_prompt",),
    "reasoning_effort": ("max_answer_len",),
}
AUTO_EVALS = 10  # evaluations per step with a validation file and no eval_interval
SAMPLE_ROWS = 64  # validation rows read at each of them (all of them at the end)
EFFORT = {"low": 0.5, "default": 1.0, "medium": 1.0, "high": 2.0}  # × max_answer_len
GROUP = 4  # answers per prompt at compute_multiplier 1


def auto_batch_size(rows: int) -> int:
    """OpenAI's: about 0.2% of the training examples, at least 1, at most 256."""
    return max(1, min(256, round(rows * 0.002)))


def auto_epochs(rows: int) -> int:
    """The OpenAI cookbook's rule: 3 epochs, more for small files (≥ 100 examples seen, at most 25),
    fewer for large ones (≤ 25,000 examples seen, at least 1)."""
    if rows * 3 < 100:
        return min(25, 100 // rows)
    if rows * 3 > 25_000:
        return max(1, 25_000 // rows)
    return 3


def auto_lr_multiplier(actor_params_b: float) -> float:
    """1 for models up to 10M parameters, 1/√(params / 10M) above (the step defaults suit tiny models)."""
    params = actor_params_b * 1e9
    return 1.0 if params <= 1e7 else round(1.0 / math.sqrt(params / 1e7), 4)


def _per_device(batch: int, processes: int, field: str) -> int:
    if batch % processes:
        raise InvalidRequestError(
            f"{field}: {batch} examples per step do not split over {processes} processes; give a "
            f"multiple of num_gpus ({processes})",
            param=field,
        )
    return batch // processes


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, max(cap, 1)) + 1) if n % d == 0)


def step_targets(
    hp: Hyperparameters | None,
    *,
    step: int,
    cls: type,
    section: dict[str, Any],
    rows: int | None,
    processes: int,
    actor_params_b: float,
    has_validation: bool,
    validation_rows: int | None,
) -> dict[str, Any]:
    """The options one step takes from the job's hyperparameters (given or "auto"). `section` holds what
    the preset and `config` set (those win over "auto"); `rows` the step's training rows (None: unknown)."""
    hp = hp or Hyperparameters()
    prefix = "hyperparameters"
    out: dict[str, Any] = {}
    lr_names = ["learning_rate"] if step < 3 else ["actor_learning_rate", "critic_learning_rate"]
    rl = (
        _reinforcement(hp, cls, section, validation_rows)
        if isinstance(hp, ReinforcementHyperparameters) and step == 3
        else {}
    )

    if hp.n_epochs != "auto":
        out["num_train_epochs"] = hp.n_epochs
    elif rows and step < 3 and "num_train_epochs" not in section and "max_steps" not in section:
        out["num_train_epochs"] = auto_epochs(rows)

    batch = hp.batch_size if hp.batch_size != "auto" else None
    if batch is None and rows and not any(k in section for k in HP_OPTIONS["batch_size"]):
        batch = auto_batch_size(rows)
        batch = max(processes, batch - batch % processes)
    if batch is not None:
        if rows is not None and hp.batch_size != "auto" and batch > rows:
            raise InvalidRequestError(
                f"{prefix}.batch_size: {batch} examples per step is more than the {rows} training rows "
                f"step {step} gets; give at most {rows}",
                param=f"{prefix}.batch_size",
            )
        per = _per_device(batch, processes, f"{prefix}.batch_size")
        if step < 3:
            micro_cap = section.get(
                "per_device_train_batch_size", step_default(cls, "per_device_train_batch_size")
            )
            micro = _largest_divisor_at_most(per, int(micro_cap))
            out |= {"per_device_train_batch_size": micro, "gradient_accumulation_steps": per // micro}
        else:
            out |= {"per_device_generation_batch_size": per, "generation_batches": 1}
            if "per_device_training_batch_size" not in section:  # one optimiser step per PPO step's answers
                group = int(rl.get("samples_per_prompt", section.get("samples_per_prompt", 1)))
                out["per_device_training_batch_size"] = per * group
                if "gradient_accumulation_steps" not in section:
                    out["gradient_accumulation_steps"] = 1

    if hp.learning_rate_multiplier != "auto":
        m = float(hp.learning_rate_multiplier)
    elif any(n in section for n in lr_names):
        m = 1.0
    else:
        m = auto_lr_multiplier(actor_params_b)
    if m != 1.0:
        for name in lr_names:
            out[name] = section.get(name, step_default(cls, name)) * m

    if isinstance(hp, DPOHyperparameters) and hp.beta != "auto" and "beta" in _fields(cls):
        out["beta"] = float(hp.beta)

    out |= rl
    if has_validation and "eval_interval" not in section and "eval_interval" not in out and rows:
        per_step = batch or _rows_per_step(cls, section, processes, step)
        epochs = out.get("num_train_epochs", section.get("num_train_epochs", 1))
        total = section.get("max_steps") or math.ceil(rows / max(per_step, 1)) * epochs
        out["eval_interval"] = max(1, total // AUTO_EVALS)
        if "eval_sample_rows" in _fields(cls) and "eval_sample_rows" not in section:
            out["eval_sample_rows"] = SAMPLE_ROWS
    return out


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _rows_per_step(cls: type, section: dict[str, Any], processes: int, step: int) -> int:
    def get(name: str) -> int:
        return int(section.get(name, step_default(cls, name)))

    if step < 3:
        return get("per_device_train_batch_size") * get("gradient_accumulation_steps") * processes
    return get("per_device_generation_batch_size") * get("generation_batches") * processes


def _reinforcement(
    hp: ReinforcementHyperparameters, cls: type, section: dict[str, Any], validation_rows: int | None
) -> dict[str, Any]:
    prefix = "method.reinforcement.hyperparameters"
    out: dict[str, Any] = {}
    if hp.eval_interval != "auto":
        out["eval_interval"] = hp.eval_interval
    if hp.eval_samples != "auto":
        if validation_rows is not None and hp.eval_samples > validation_rows:
            raise InvalidRequestError(
                f"{prefix}.eval_samples: {hp.eval_samples} is more than the {validation_rows} validation "
                f"rows; give at most {validation_rows}",
                param=f"{prefix}.eval_samples",
            )
        out["eval_max_rows"] = hp.eval_samples
    if hp.compute_multiplier != "auto":
        out["samples_per_prompt"] = max(2, round(GROUP * float(hp.compute_multiplier)))
    if hp.reasoning_effort is not None:
        budget = section.get("max_answer_len", step_default(cls, "max_answer_len"))
        out["max_answer_len"] = max(8, round(budget * EFFORT[hp.reasoning_effort]))
    return out


def resolved(
    built: Any, *, step: int, cls: type, processes: int, method_hp: dict[str, Any]
) -> dict[str, Any]:
    """The hyperparameters a job shows once it starts: the values its main step runs with."""
    lr_name = "learning_rate" if step < 3 else "actor_learning_rate"
    out = dict(method_hp)
    out["n_epochs"] = built.num_train_epochs
    out["batch_size"] = built.batch_rows(processes)[0]
    out["learning_rate_multiplier"] = round(getattr(built, lr_name) / step_default(cls, lr_name), 6)
    if "beta" in out and hasattr(built, "beta"):
        out["beta"] = built.beta
    if step == 3 and "eval_interval" in out:
        out |= {
            "eval_interval": built.eval_interval,
            "eval_samples": built.eval_max_rows,
            "compute_multiplier": round(built.samples_per_prompt / GROUP, 4),
        }
    return out
