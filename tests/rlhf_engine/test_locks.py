"""Locks die with their holder and every wait for one ends (rlhf_engine/locks.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_engine import locks

HERE = Path(__file__).resolve().parent
HOLD_FILE = HERE.parent / "helpers" / "hold_file.py"


def _holder(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "lock_holder.py"), str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_dies_with_its_holder_even_by_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = _holder(path)
    holder.kill()  # SIGKILL: no finally, no cleanup — the kernel drops the flock
    holder.wait(timeout=10)
    # were it held still, this would wait 5 s and raise LockTimeoutError
    with locks.hold(path, what="a test lock", timeout_s=5) as waited:
        assert waited < 1.0  # free at once
    assert path.exists()  # the file stays; it never meant anything by itself


def test_a_wait_ends_with_an_error_naming_the_lock_and_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    holder = _holder(path)
    beats: list[float] = []
    try:
        with (
            pytest.raises(locks.LockTimeoutError) as e,
            locks.hold(path, what="the test's lock", timeout_s=0.5, on_wait=beats.append),
        ):
            pass
        assert "the test's lock" in str(e.value) and f"pid {holder.pid}" in str(e.value), e.value
        assert beats, "the waiter's heartbeat was not called while it waited"
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_holders_and_working_in_see_a_live_process(tmp_path: Path) -> None:
    baton = tmp_path / "lock"
    proc = subprocess.Popen(  # creates the file, keeps it open, says 'ok' and sleeps 60 s
        [sys.executable, str(HOLD_FILE), str(baton), "ok", "60"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"
        assert locks.holders(baton) == [proc.pid]
        assert proc.pid in locks.working_in(tmp_path)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert locks.holders(baton) == [] and proc.pid not in locks.working_in(tmp_path)
