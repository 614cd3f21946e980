"""A job's numbers as OpenAI's fine-tuning API names them: the `metrics` events, the checkpoints'
`metrics`, and the results CSV (purpose `fine-tune-results`). One owner for the names, so the three agree.

The steps write their own keys (`loss`, `mean_token_accuracy`, `valid_*` at eval points, `full_valid_*`
after the last step, `reward_mean`, `kl_to_ref`, …: metrics.jsonl); OpenAI's names come first here and
ours follow under their own names.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

# ours → OpenAI's (the SDK's FineTuningJobCheckpoint.metrics and the metrics events)
SDK_NAMES = {
    "loss": "train_loss",
    "mean_token_accuracy": "train_mean_token_accuracy",
}
SDK_KEYS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)
# OpenAI's results CSV columns, in its order (its `train_accuracy` is the token accuracy)
CSV_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
# ours that never go into events, checkpoints or the CSV (bookkeeping, not measurements)
_SKIP = {"time", "step", "epoch"}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def sdk_metrics(values: dict[str, Any], *, global_step: int) -> dict[str, Any]:
    """One metric point (a step's metrics.jsonl line) with OpenAI's names first, then ours."""
    out: dict[str, Any] = {"step": global_step}
    for ours, theirs in SDK_NAMES.items():
        if _number(values.get(ours)):
            out[theirs] = values[ours]
    for k in SDK_KEYS:
        if k not in out and _number(values.get(k)):
            out[k] = values[k]
    for k, v in values.items():
        if k not in _SKIP and k not in out and k not in SDK_NAMES and _number(v):
            out[k] = v
    return out


def event_message(data: dict[str, Any], total_steps: int | None) -> str:
    """OpenAI's wording of a metrics event: 'Step 3/20: training loss=1.2345, validation loss=…'."""
    of = f"/{total_steps}" if total_steps else ""
    said = [
        f"{label}={data[k]:.4f}"
        for k, label in (
            ("train_loss", "training loss"),
            ("valid_loss", "validation loss"),
            ("full_valid_loss", "full validation loss"),
            ("reward_mean", "reward"),
            ("kl_to_ref", "kl"),
        )
        if _number(data.get(k))
    ]
    return f"Step {data['step']}{of}: " + (", ".join(said) or "metrics")


def results_csv(points: Iterable[tuple[int, int, dict[str, Any]]], *, multi_step: bool) -> tuple[bytes, int]:
    """(the CSV's bytes, its rows) from (job step, global step, values) points, oldest first: OpenAI's
    columns, then every other number a step logged; with `multi_step`, a `job_step` column says which of
    the job's steps (1 SFT, 2 reward/DPO, 3 RL) a row belongs to."""
    rows: list[dict[str, Any]] = []
    extra: list[str] = []
    for job_step, gs, values in points:
        m = sdk_metrics(values, global_step=gs)
        row = {
            "step": gs,
            "train_loss": m.get("train_loss"),
            "train_accuracy": m.get("train_mean_token_accuracy"),
            "valid_loss": m.get("valid_loss"),
            "valid_mean_token_accuracy": m.get("valid_mean_token_accuracy"),
        }
        for k, v in m.items():
            if k not in row and k != "train_mean_token_accuracy":
                row[k] = v
                if k not in extra:
                    extra.append(k)
        if multi_step:
            row["job_step"] = job_step
        rows.append(row)
    columns = [*CSV_COLUMNS, *extra, *(["job_step"] if multi_step else [])]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue().encode(), len(rows)
