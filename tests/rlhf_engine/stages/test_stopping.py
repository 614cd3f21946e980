"""Stopping a step on request (what pause and worker shutdown use): checkpoint, exit 75, resume exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_engine.runtime import fencing
from rlhf_engine.runtime.launch import LAUNCH_VARS
from rlhf_engine.runtime.stopping import EXIT_STOPPED, STOP_FILE
from rlhf_engine.stages.records import read_jsonl
from tests.runs import rlhf_ok

pytestmark = pytest.mark.slow  # every test here trains a step

ARGS = [
    "sft",
    "--per-device-train-batch-size",
    2,
    "--max-steps",
    60,
    "--checkpoint-interval",
    0,
    "--max-seq-len",
    128,
    "--eval-max-rows",
    16,
    "--dropout",
    0.0,
]


def _start(args: list[object], **extra_env: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | extra_env
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf_engine.cli", *map(str, args)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_metrics(step_dir: Path, proc: subprocess.Popen[str], n: int = 3) -> None:
    deadline = time.monotonic() + 120
    metrics = step_dir / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None and time.monotonic() < deadline, "the step ended before training"
        time.sleep(0.02)


def test_stop_file_checkpoints_exits_75_and_the_rerun_resumes(tmp_path: Path, base_model: Path) -> None:
    args = [*ARGS, "--model", base_model, "--output-dir", tmp_path]
    step_dir = tmp_path / "step1_sft"
    proc = _start(args)
    _wait_for_metrics(step_dir, proc)
    (step_dir / STOP_FILE).write_text("pause")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    assert "run the same command again to resume" in err
    events = read_jsonl(step_dir / "events.jsonl")
    stopped = [e for e in events if e["type"] == "step_stopped"]
    assert len(stopped) == 1 and not (step_dir / "summary.json").exists()
    at = stopped[0]["data"]["global_step"]
    assert 3 <= at < 60
    assert any(e["type"] == "checkpoint_saved" and e["data"]["global_step"] == at for e in events)
    (step_dir / STOP_FILE).unlink()
    rlhf_ok(*args)
    assert [m["step"] for m in read_jsonl(step_dir / "metrics.jsonl")] == list(range(1, 61))
    straight = tmp_path / "straight"
    rlhf_ok(*ARGS, "--model", base_model, "--output-dir", straight)
    a = read_jsonl(step_dir / "metrics.jsonl")
    b = read_jsonl(straight / "step1_sft" / "metrics.jsonl")
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], abs=1e-6)  # resumed exactly


def test_sigterm_stops_at_a_checkpoint(tmp_path: Path, base_model: Path) -> None:
    args = [*ARGS, "--model", base_model, "--output-dir", tmp_path]
    step_dir = tmp_path / "step1_sft"
    proc = _start(args)
    _wait_for_metrics(step_dir, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED
    assert any(e["type"] == "step_stopped" for e in read_jsonl(step_dir / "events.jsonl"))


def test_an_orphaned_step_checkpoints_and_exits(tmp_path: Path, base_model: Path) -> None:
    """The worker that started the step dies (here: a stand-in process, SIGKILLed): the step does not
    train on alone; it checkpoints at its next boundary and leaves, and a rerun resumes there."""
    args = [*ARGS, "--model", base_model, "--output-dir", tmp_path]
    step_dir = tmp_path / "step1_sft"
    worker = subprocess.Popen(["sleep", "300"])
    proc = _start(args, **{fencing.WATCH_ENV: str(worker.pid), fencing.GRACE_ENV: "60"})
    _wait_for_metrics(step_dir, proc)
    worker.kill()
    worker.wait()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_STOPPED, err[-2000:]
    assert "is gone; stopping" in err
    stopped = [e for e in read_jsonl(step_dir / "events.jsonl") if e["type"] == "step_stopped"]
    assert len(stopped) == 1 and stopped[0]["data"]["global_step"] < 60
    rlhf_ok(*args)
    assert [m["step"] for m in read_jsonl(step_dir / "metrics.jsonl")] == list(range(1, 61))


def test_a_superseded_step_stops_without_writing(tmp_path: Path, base_model: Path) -> None:
    """A newer attempt raised the folder's fence: the old step writes nothing more and exits 76."""
    args = [*ARGS, "--model", base_model, "--output-dir", tmp_path]
    step_dir = tmp_path / "step1_sft"
    fencing.write_fence(step_dir, 1)
    proc = _start(args, **{fencing.ATTEMPT_ENV: "1"})
    _wait_for_metrics(step_dir, proc)
    fencing.write_fence(step_dir, 2)
    written = (step_dir / "metrics.jsonl").read_text()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == fencing.EXIT_SUPERSEDED, err[-2000:]
    assert "superseded by attempt 2" in err
    after = (step_dir / "metrics.jsonl").read_text()
    assert after.startswith(written)  # at most the line whose check passed before the fence moved
    assert len(after.splitlines()) <= len(written.splitlines()) + 1
    assert not (step_dir / "summary.json").exists()
    assert not any(e["type"] in ("error", "step_finished") for e in read_jsonl(step_dir / "events.jsonl"))
