"""The ids of fine-tuned models, in one place (models, checkpoints, the worker that registers them)."""

from __future__ import annotations

from service.db.models import Job


def fine_tuned_id(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's shape: `ft:<base>:<suffix>:<job_id>` (a job's other models add `:sft`, `:ema`)."""
    return f"ft:{base}:{suffix or ''}:{job_id}"


def job_model_id(job: Job) -> str:
    """The model id a job registers (or will, while it runs)."""
    base = job.model.split(":")[1] if job.model.startswith("ft:") else job.model
    return job.fine_tuned_model or fine_tuned_id(base, job.suffix, job.id)
