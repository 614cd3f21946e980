"""One job lifecycle: every status change goes through service/jobs/lifecycle.py as a guarded UPDATE,
so two actors racing for one job (the user and the worker, two workers, a worker and the sweeper)
cannot both win. The races run on PostgreSQL with real threads and real transactions; the table of
transitions in docs/jobs.md is the code's."""

from __future__ import annotations

import ast
import re
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from service.db.models import FineTunedModel, Job, JobEvent, Tenant, utcnow
from service.db.session import session_scope
from service.errors import WrongStateError
from service.jobs import lifecycle, states
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 12


@pytest.fixture(scope="module")
def settings(new_pg: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    from service.db.migrate import migrate

    s = Settings(
        data_dir=tmp_path_factory.mktemp("lifecycle"), database_url=new_pg(), lease_s=60.0, sweep_s=1.0
    )
    migrate(s.db_url)
    with session_scope(s.db_url) as db:
        db.add(Tenant(id="t"))
    yield s


def _job(settings: Settings, status: states.JobStatus, **values: Any) -> str:
    """A job row put straight into `status` (the test's setup: no transition is under test here)."""
    with session_scope(settings.db_url) as db:
        values = {"enqueued_at": utcnow()} | values
        job = Job(
            tenant_id="t",
            status=status,
            method="supervised",
            model="tiny-opt-xs",
            seed=1,
            request={},
            plan={},
            steps=[1],
            step_status={"1": "running" if status == "running" else "pending"},
            output_dir=str(settings.runs_dir / "x"),
            **values,
        )
        db.add(job)
        db.flush()
        return job.id


def _race(*actors: Callable[[], Any]) -> list[Any]:
    """Run the actors at once (each in its own thread, session and transaction); their results, an
    exception standing for its actor's result."""
    barrier = threading.Barrier(len(actors))
    results: list[Any] = [None] * len(actors)

    def run(i: int, fn: Callable[[], Any]) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as e:  # the loser's WrongStateError is a result here
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(actors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _get(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.db_url) as db:
        job = db.get(Job, job_id)
        assert job is not None
        db.expunge(job)
        return job


def _events(settings: Settings, job_id: str) -> list[str]:
    with session_scope(settings.db_url) as db:
        return [e.type for e in db.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.seq)]


def test_a_cancel_and_the_workers_success_never_both_win(settings: Settings) -> None:
    """The user cancels as the worker records the job's success: one of them wins, and the job reads
    as the winner says (a cancelled job registers no model; a succeeded one refuses the cancel)."""
    wins = {"cancelled": 0, "succeeded": 0}
    for i in range(ROUNDS):
        job_id = _job(settings, "running", lease_owner="w1", lease_until=utcnow() + timedelta(minutes=1))
        model_id = f"ft:tiny-opt-xs:race{i}:{job_id}"

        def cancel(job_id: str = job_id) -> Any:
            with session_scope(settings.db_url) as db:
                return lifecycle.cancel(session=db, tenant="t", job_id=job_id).status

        def succeed(job_id: str = job_id, model_id: str = model_id) -> Any:
            with session_scope(settings.db_url) as db:
                return lifecycle.finish(
                    session=db,
                    job_id=job_id,
                    owner="w1",
                    outcome="succeeded",
                    step=1,
                    models={model_id: Path("/m")},
                    fine_tuned_model=model_id,
                )

        user, worker = _race(cancel, succeed)
        job = _get(settings, job_id)
        with session_scope(settings.db_url) as db:
            registered = db.get(FineTunedModel, model_id) is not None
        events = _events(settings, job_id)
        if user == "cancelled":
            assert worker == "cancelled" and job.status == "cancelled" and not registered
            assert job.fine_tuned_model is None and job.step_status == {"1": "cancelled"}
            assert "job_succeeded" not in events and events.count("cancelled") == 1
        else:
            assert isinstance(user, WrongStateError) and "already succeeded" in user.message, user
            assert worker == "succeeded" and job.status == "succeeded" and registered
            assert "cancelled" not in events and events.count("job_succeeded") == 1
        assert job.lease_owner is None  # let go either way
        wins[job.status] += 1
    assert sum(wins.values()) == ROUNDS


def test_two_workers_and_the_sweeper_one_claim_wins(settings: Settings) -> None:
    """A redelivered message reaches two workers while the sweeper looks at the same stale job: one
    worker takes it, once; the other gets nothing; the sweeper leaves a claimed job alone."""
    for _ in range(ROUNDS):
        job_id = _job(settings, "queued", enqueued_at=utcnow() - timedelta(hours=1))

        def claim(owner: str, job_id: str = job_id) -> Any:
            with session_scope(settings.db_url) as db:
                job = lifecycle.claim(session=db, job_id=job_id, owner=owner, settings=settings)
                return job.lease_owner if job else None

        def sweep() -> Any:
            with session_scope(settings.db_url) as db:
                return lifecycle.sweep(session=db, settings=settings)

        a, b, swept = _race(lambda: claim("w1"), lambda: claim("w2"), sweep)
        job = _get(settings, job_id)
        assert [a, b].count(None) == 1, (a, b)
        assert job.status == "running" and job.lease_owner == (a or b) and job.attempts == 1
        assert isinstance(swept, list)  # swept before the claim (queued again) or not at all


def test_a_resume_and_a_cancel_of_a_paused_job_one_wins(settings: Settings) -> None:
    for _ in range(ROUNDS):
        job_id = _job(settings, "paused")

        def act(fn: Callable[..., Job], job_id: str = job_id, **kw: Any) -> Any:
            with session_scope(settings.db_url) as db:
                return fn(session=db, tenant="t", job_id=job_id, **kw).status

        resumed, cancelled = _race(
            lambda: act(lifecycle.resume, settings=settings), lambda: act(lifecycle.cancel)
        )
        final = _get(settings, job_id).status
        if resumed == "queued":
            # the cancel came second: a queued job can be cancelled too, so both moves happen, in order
            assert cancelled == "cancelled" and final == "cancelled"
        else:
            assert isinstance(resumed, WrongStateError) and "already cancelled" in resumed.message
            assert cancelled == "cancelled" and final == "cancelled"


def test_a_pause_and_a_claim_of_a_queued_job_agree(settings: Settings) -> None:
    """Pausing a queued job as a worker claims it: either paused and unclaimed, or claimed with the
    pause asked of the worker — never running with the pause lost."""
    for _ in range(ROUNDS):
        job_id = _job(settings, "queued")

        def pause(job_id: str = job_id) -> Any:
            with session_scope(settings.db_url) as db:
                return lifecycle.pause(session=db, tenant="t", job_id=job_id).status

        def claim(job_id: str = job_id) -> Any:
            with session_scope(settings.db_url) as db:
                return lifecycle.claim(session=db, job_id=job_id, owner="w1", settings=settings) is not None

        paused, claimed = _race(pause, claim)
        job = _get(settings, job_id)
        if claimed:
            assert job.status == "running" and job.control == "pause" and paused == "running"
        else:
            assert job.status == "paused" and paused == "paused" and job.lease_owner is None


def test_a_worker_that_lost_its_lease_writes_nothing(settings: Settings) -> None:
    job_id = _job(settings, "running", lease_owner="w2", lease_until=utcnow() + timedelta(minutes=1))
    with session_scope(settings.db_url) as db:
        assert (
            lifecycle.finish(session=db, job_id=job_id, owner="w1", outcome="failed", step=1, message="x")
            == "lost"
        )
        with pytest.raises(lifecycle.LeaseLostError):
            lifecycle.renew(session=db, job_id=job_id, owner="w1", settings=settings, progress=0.5)
    job = _get(settings, job_id)
    assert job.status == "running" and job.lease_owner == "w2" and job.error is None and job.progress == 0.0


def test_a_finished_job_never_moves_again(settings: Settings) -> None:
    for status in states.TERMINAL:
        job_id = _job(settings, status)
        with session_scope(settings.db_url) as db:
            for move in (lifecycle.cancel, lifecycle.pause):
                with pytest.raises(WrongStateError, match=f"is already {status}"):
                    move(session=db, tenant="t", job_id=job_id)
            with pytest.raises(WrongStateError, match="only a paused job can be resumed"):
                lifecycle.resume(session=db, tenant="t", job_id=job_id, settings=settings)
            assert lifecycle.claim(session=db, job_id=job_id, owner="w1", settings=settings) is None
        assert _get(settings, job_id).status == status


# ---------------------------------------------------------------------------- one owner, one table


def _writes_status(path: Path) -> list[int]:
    """Lines of `path` that set a job's status: `x.status = …`, or `status=` inside `.values(…)` or
    `Job(…)`."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "status" for t in targets):
                lines.append(node.lineno)
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("values", "Job") and any(k.arg == "status" for k in node.keywords):
                lines.append(node.lineno)
    return lines


def test_only_the_lifecycle_module_changes_a_jobs_status() -> None:
    owner = ROOT / "service" / "jobs" / "lifecycle.py"
    runs = ROOT / "service" / "services" / "evals.py"  # the one owner of an eval run's status
    assert _writes_status(owner), "the check finds nothing: it has stopped reading the code"
    elsewhere = {
        str(p.relative_to(ROOT)): lines
        for d in ("service", "workers")
        for p in sorted((ROOT / d).rglob("*.py"))
        if p not in (owner, runs) and "gen" not in p.parts and (lines := _writes_status(p))
    }
    assert elsewhere == {}, f"status written outside service/jobs/lifecycle.py: {elsewhere}"


def test_the_readme_lists_the_transitions_the_code_allows() -> None:
    text = (ROOT / "docs" / "jobs.md").read_text()  # the table moved from README.md to the docs' Jobs page
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \| `(\w+)` \| (\w+) \|", text, flags=re.M)
    table = [(name, tuple(re.findall(r"`(\w+)`", src)), to, by) for name, src, to, by in rows]
    assert table == [(t.name, t.source, t.target, t.by) for t in states.TRANSITIONS]
    for source in states.ACTIVE:
        for target in states.TERMINAL:
            allowed = any(source in t.source and t.target == target for t in states.TRANSITIONS)
            assert allowed == (target == "cancelled" or source == "running"), (source, target)
