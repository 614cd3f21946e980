"""One trainer per step folder: the fencing token, the writer lock and the orphan watchdog.

Real processes (no torch): a holder of the lock, a watched parent that dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_engine.runtime import fencing
from rlhf_engine.stages.records import Records, read_jsonl

HERE = Path(__file__).resolve().parent


def _python(program: str, *args: str, **env: str) -> subprocess.Popen[str]:
    """Run `program` (a script next to this file: fencing_holder.py, fencing_rank.py, fencing_orphan.py)."""
    return subprocess.Popen(
        [sys.executable, str(HERE / program), *args],
        env={**os.environ, **env},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait(cond: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_fence_only_rises(tmp_path: Path) -> None:
    assert fencing.read_fence(tmp_path) is None
    assert fencing.write_fence(tmp_path, 3) == 3
    assert fencing.write_fence(tmp_path, 2) == 3  # a stale worker cannot take the folder back
    assert fencing.read_fence(tmp_path) == 3
    assert fencing.write_fence(tmp_path, 4) == 4


def test_a_superseded_attempt_stops_without_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fencing.ATTEMPT_ENV, "1")
    fencing.write_fence(tmp_path, 1)
    records = Records(tmp_path, enabled=True)
    with fencing.writer(tmp_path):
        records.metric(step=1, loss=1.0)
        fencing.write_fence(tmp_path, 2)  # the job was claimed again
        for write in (
            lambda: records.metric(step=2, loss=0.9),
            lambda: records.event("eval", "x"),
            lambda: records.summary({"done": True}),
            lambda: records.truncate(0),
        ):
            with pytest.raises(fencing.SupersededError, match="superseded by attempt 2"):
                write()
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1]
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "events.jsonl").exists()
    records.metric(step=2, loss=0.9)  # outside a fenced step (a plain CLI run) nothing is refused


def test_an_old_attempt_cannot_start_on_a_newer_fence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fencing.write_fence(tmp_path, 5)
    monkeypatch.setenv(fencing.ATTEMPT_ENV, "4")
    with pytest.raises(fencing.SupersededError), fencing.writer(tmp_path):
        pass


def test_a_new_attempt_waits_for_a_lingering_holder_then_ends_it(tmp_path: Path) -> None:
    holder = _python("fencing_holder.py", str(tmp_path))
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with fencing.writer(tmp_path, wait_s=1.0) as waited:
        assert holder.wait(timeout=5) == -signal.SIGTERM  # ended by the new holder, not before the wait
        assert 1.0 <= waited < 10
        assert f'"pid": {os.getpid()}' in (tmp_path / fencing.WRITER_LOCK).read_text()
    assert time.monotonic() - started >= 1.0


def test_the_lock_is_free_once_the_holder_is_gone(tmp_path: Path) -> None:
    holder = _python("fencing_holder.py", str(tmp_path))
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: the kernel drops the flock with the process
    holder.wait()
    with fencing.writer(tmp_path, wait_s=30) as waited:
        assert waited < 1


def test_ranks_of_a_dead_top_process_stop_and_the_next_holder_waits_for_them(tmp_path: Path) -> None:
    top = subprocess.Popen(["sleep", "120"])  # stands in for the step's top process
    rank = _python(
        "fencing_rank.py", str(tmp_path), **{fencing.WATCH_ENV: str(top.pid), fencing.GRACE_ENV: "30"}
    )
    assert rank.stdout is not None and rank.stdout.readline().strip() == "rank"
    top.kill()
    top.wait()
    with fencing.writer(tmp_path, wait_s=60) as waited:
        # it stopped by itself (its SIGTERM path), and only then did we get the folder
        assert rank.poll() == 0
        assert waited >= 1.0


def test_an_orphan_that_ignores_sigterm_leaves_after_its_grace(tmp_path: Path) -> None:
    parent = subprocess.Popen(["sleep", "120"])
    child = _python(  # ignores SIGTERM: a step stuck between boundaries
        "fencing_orphan.py", "stuck", **{fencing.WATCH_ENV: str(parent.pid), fencing.GRACE_ENV: "1"}
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "up"
    parent.kill()
    parent.wait()
    assert child.wait(timeout=15) == fencing.EXIT_ORPHANED
    assert child.stderr is not None and "is gone; stopping" in child.stderr.read()


def test_a_step_whose_starter_is_already_gone_does_not_start() -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    child = _python("fencing_orphan.py", "step", **{fencing.WATCH_ENV: str(gone.pid)})
    out, err = child.communicate(timeout=15)
    assert child.returncode == fencing.EXIT_ORPHANED and "trained" not in out, err


def test_a_model_build_started_by_a_worker_ends_with_it(tmp_path: Path) -> None:
    """Workers build bundled models in child processes; a build outliving its worker would race the next
    worker's build into the same folder."""
    from rlhf_engine.models.tiny import PROGRESS_ENV

    worker = subprocess.Popen(["sleep", "300"])
    progress = tmp_path / "progress"  # pretraining writes its step there every 10 steps
    build = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlhf_engine.cli",
            "models",
            "tiny",
            "--arch",
            "llama",
            "--size",
            "m",
            "--pretrain-steps",
            "5000",
            "--seed",
            "99",
            "--out",
            str(tmp_path / "m"),
            "--sample",
            "",
        ],
        env={**os.environ, fencing.WATCH_ENV: str(worker.pid), PROGRESS_ENV: str(progress)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait(lambda: progress.exists() or build.poll() is not None, timeout=120)  # pretraining under way
    assert build.poll() is None, build.communicate()[1][-2000:]
    worker.kill()
    worker.wait()
    _, err = build.communicate(timeout=30)
    assert build.returncode == -signal.SIGTERM, err[-2000:]
    assert not (tmp_path / "m" / "config.json").exists()
