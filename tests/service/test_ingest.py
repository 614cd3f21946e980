"""The training worker copies a step's metrics.jsonl into the database while the step runs. A step
killed and resumed cuts the file back to its checkpoint and writes the steps past it again; the
database must end with every optimizer step exactly once, holding the resumed attempt's values.

(Found by tests/service/test_one_trainer.py: after the step alone was killed, the database lacked
step 34 — the rewritten file had outgrown the old read offset before the next read, and reading went
on from the middle of a line.)"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf_engine.stages.records import METRICS, Records, read_jsonl
from service.db.models import Job, JobMetric, Tenant
from service.db.session import session_scope
from service.settings import Settings
from workers.training import Ingest


@pytest.fixture(scope="module")
def settings(new_pg: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    from service.db.migrate import migrate

    s = Settings(data_dir=tmp_path_factory.mktemp("ingest"), database_url=new_pg())
    migrate(s.db_url)
    with session_scope(s.db_url) as db:
        db.add(Tenant(id="t"))
    yield s


def _job(settings: Settings, out: Path) -> str:
    with session_scope(settings.db_url) as db:
        job = Job(
            tenant_id="t",
            status="running",
            method="supervised",
            model="tiny-opt-xs",
            seed=1,
            request={},
            plan={},
            steps=[1],
            step_status={"1": "running"},
            output_dir=str(out),
        )
        db.add(job)
        db.flush()
        return job.id


def _rows(settings: Settings, job_id: str) -> dict[int, float]:
    with session_scope(settings.db_url) as db:
        rows = db.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.global_step)
        ).all()
        steps = [r.global_step for r in rows]
        assert len(steps) == len(set(steps)), f"a step twice: {steps}"
        return {r.global_step: r.values["loss"] for r in rows}


def _ingest(settings: Settings, ingest: Ingest) -> None:
    with session_scope(settings.db_url) as db:
        ingest.run(db)


def _first_attempt(settings: Settings, tmp_path: Path, losses: dict[int, float]) -> tuple[Path, str, Ingest]:
    """A job whose step 1 wrote `losses` (step → loss), all read by the worker: (step dir, job, reader)."""
    step_dir = tmp_path / "step1_sft"
    job_id = _job(settings, tmp_path)
    ingest = Ingest(job_id, 1, step_dir)
    first = Records(step_dir, enabled=True)
    for s, loss in losses.items():
        first.metric(step=s, loss=loss)
    _ingest(settings, ingest)
    assert sorted(_rows(settings, job_id)) == sorted(losses)
    return step_dir, job_id, ingest


def _metric(db: Session, job_id: str, step: int) -> JobMetric:
    return db.scalars(
        select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.global_step == step)
    ).one()


@pytest.mark.parametrize("longer", [False, True], ids=["shorter lines", "longer lines"])
def test_a_resumed_step_rewriting_its_metrics_leaves_each_step_once_with_the_new_values(
    settings: Settings, tmp_path: Path, longer: bool
) -> None:
    # the first attempt: steps 1-7 (its checkpoint at 4), all read by the worker, then killed
    losses = {s: round(10.0 - s, 1) if longer else 10.0 - s + 1 / 3 for s in range(1, 8)}
    step_dir, job_id, ingest = _first_attempt(settings, tmp_path, losses)

    # the resumed attempt cuts the file back to step 4 and writes 5-9 before the worker reads again;
    # its lines differ in length from the killed attempt's, so the old read offset lands inside a line
    again = Records(step_dir, enabled=True)
    again.truncate(4)
    for s in range(5, 10):
        again.metric(step=s, loss=5.0 - s / 7 if longer else float(-s))
    _ingest(settings, ingest)

    in_file = {m["step"]: m["loss"] for m in read_jsonl(step_dir / METRICS)}
    assert list(in_file) == list(range(1, 10))
    assert _rows(settings, job_id) == in_file  # every step once, the resumed attempt's values

    # a later line appended to the same file is read once, from where the reader left off
    again.metric(step=10, loss=0.5)
    _ingest(settings, ingest)
    _ingest(settings, ingest)
    assert _rows(settings, job_id) == in_file | {10: 0.5}


def test_a_step_started_afresh_or_rewritten_in_place_is_mirrored_and_what_the_worker_added_stays(
    settings: Settings, tmp_path: Path
) -> None:
    step_dir, job_id, ingest = _first_attempt(settings, tmp_path, {s: 10.0 - s + 1 / 3 for s in range(1, 6)})

    # what the worker adds to a row (the step's peak memory) survives a later re-read of the same line
    with session_scope(settings.db_url) as db:
        row = _metric(db, job_id, 5)
        row.values = {**row.values, "peak_memory_mib": 123.0}
    _ingest(settings, Ingest(job_id, 1, step_dir))  # a worker restarted reads the file from its start
    with session_scope(settings.db_url) as db:
        assert _metric(db, job_id, 5).values["peak_memory_mib"] == 123.0

    # the file rewritten in place (same inode) with other lines, longer than before: read from its start
    lines = [{"time": 1.0, "step": s, "loss": float(s), "note": "rewritten"} for s in range(1, 8)]
    with open(step_dir / METRICS, "r+") as f:
        f.truncate(0)
        f.writelines(json.dumps(m) + "\n" for m in lines)
    _ingest(settings, ingest)
    assert _rows(settings, job_id) == {s: float(s) for s in range(1, 8)}

    # the step started afresh (no checkpoint): its files deleted, two new steps written before the next
    # read; the rows are the new file's, the seven earlier ones gone
    again = Records(step_dir, enabled=True)
    again.reset()
    again.metric(step=1, loss=-1.0)
    again.metric(step=2, loss=-2.0)
    _ingest(settings, ingest)
    assert _rows(settings, job_id) == {1: -1.0, 2: -2.0}

    # a resumed step that has not yet written again the steps past its checkpoint: the killed
    # attempt's rows for them are dropped until it does
    for s in range(3, 7):
        again.metric(step=s, loss=-float(s))
    _ingest(settings, ingest)
    Records(step_dir, enabled=True).truncate(4)
    _ingest(settings, ingest)
    assert _rows(settings, job_id) == {s: -float(s) for s in range(1, 5)}
