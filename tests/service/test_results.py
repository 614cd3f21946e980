"""A job's results CSV (OpenAI's `result_files`): written when the job ends after training logged a step,
failed jobs included, with OpenAI's columns first; readable through GET /v1/files/{id}/content only by
the job's tenant. The worker's own finishing code on a real database (no training: the metric points
are written as a step writes them)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from service.db.models import JobMetric
from service.db.session import session_scope
from service.jobs import lifecycle
from tests.service.conftest import SMALL_SFT, Stack
from workers import training


def test_a_job_that_fails_after_training_started_gets_its_results_csv(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    with stack.client(stack.key("results")) as c, stack.client(stack.key("other")) as other:
        job = c.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()
        with session_scope(stack.settings.db_url) as s:
            assert lifecycle.claim(session=s, job_id=job["id"], owner="w1", settings=stack.settings)
            for gs, values in enumerate(
                [
                    {"loss": 2.5, "mean_token_accuracy": 0.25, "lr": 1e-3},
                    {"loss": 2.0, "mean_token_accuracy": 0.5, "lr": 1e-3, "valid_loss": 2.2},
                    {"loss": 1.5, "mean_token_accuracy": 0.75, "lr": 1e-3},
                ],
                start=1,
            ):
                s.add(
                    JobMetric(
                        job_id=job["id"], step=1, global_step=gs, time=0.0, values={"step": gs, **values}
                    )
                )
        assert (
            training._finish(stack.settings, job["id"], "w1", training.Outcome("failed", "boom"), 1)
            == "failed"
        )
        done = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert done["status"] == "failed" and len(done["result_files"]) == 1
        results = done["result_files"][0]
        meta = c.get(f"/v1/files/{results}").json()
        assert meta["purpose"] == "fine-tune-results" and meta["filename"] == f"step_metrics_{job['id']}.csv"
        text = c.get(f"/v1/files/{results}/content").text
        rows: list[dict[str, Any]] = list(csv.DictReader(io.StringIO(text)))
        assert (
            text.splitlines()[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy,lr"
        )
        assert [(r["step"], r["train_loss"], r["train_accuracy"], r["valid_loss"]) for r in rows] == [
            ("1", "2.5", "0.25", ""),
            ("2", "2.0", "0.5", "2.2"),
            ("3", "1.5", "0.75", ""),
        ]
        assert other.get(f"/v1/files/{results}/content").status_code == 404
        # finishing again (a worker redoing its bookkeeping) writes no second file
        with session_scope(stack.settings.db_url) as s:
            training._results_file(s, job["id"], stack.settings)
        assert c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["result_files"] == [results]
        # a job that never trained has none
        idle = c.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"seed": 9}).json()
        with session_scope(stack.settings.db_url) as s:
            assert lifecycle.claim(session=s, job_id=idle["id"], owner="w1", settings=stack.settings)
        training._finish(stack.settings, idle["id"], "w1", training.Outcome("failed", "no data"), None)
        assert c.get(f"/v1/fine_tuning/jobs/{idle['id']}").json()["result_files"] == []
