"""DeepSpeed's JIT ops never wait on a dead builder (rlhf_engine/runtime/ops.py).

torch guards each op's build folder with a baton file; a builder killed halfway leaves it, and every
later build waited on it for ever (a job sat 'running 0%' for hours). Each case loads the op in a fresh
process (DeepSpeed keeps loaded ops per process) from a copy of the machine's built cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_engine.runtime import ops

HERE = Path(__file__).resolve().parent
LOAD = HERE / "ops_loader.py"  # loads the shared-memory op in a fresh process
HOLD_FILE = HERE.parents[1] / "helpers" / "hold_file.py"


@pytest.fixture
def extensions(tmp_path: Path) -> Path:
    """A copy of the shared-memory op's built folder (built by `make install`), as TORCH_EXTENSIONS_DIR."""
    source = ops.extensions_dir() / ops.OP_NAMES["ShareMemCommBuilder"]
    if not any(source.glob("*.so")):
        pytest.skip("the ops are not built here; `make install` builds them")
    root = tmp_path / "torch_extensions"
    shutil.copytree(source, root / source.name, ignore=shutil.ignore_patterns(ops.BATON))
    return root


def _load(
    root: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(LOAD)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"TORCH_EXTENSIONS_DIR": str(root), "DS_ACCELERATOR": "cpu"} | (env or {}),
    )


def test_a_killed_builders_baton_is_removed_and_the_op_loads(extensions: Path) -> None:
    baton = extensions / ops.OP_NAMES["ShareMemCommBuilder"] / ops.BATON
    baton.touch()  # what a builder killed halfway leaves: torch's own wait on it never ends
    done = _load(extensions)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removed the build lock a killed build left behind" in done.stderr
    assert not baton.exists()


def test_a_baton_a_live_process_holds_is_waited_for_then_named(extensions: Path) -> None:
    baton = extensions / ops.OP_NAMES["ShareMemCommBuilder"] / ops.BATON
    holder = subprocess.Popen(  # creates the baton, keeps it open, says 'held' and sleeps 600 s
        [sys.executable, str(HOLD_FILE), str(baton), "held", "600"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        done = _load(extensions, env={ops.TIMEOUT_ENV: "3"})  # another builder at work: wait, within a bound
        assert done.returncode != 0 and time.monotonic() - started < 60
        assert f"pid {holder.pid}" in done.stderr and ops.TIMEOUT_ENV in done.stderr, done.stderr[-2000:]
        assert baton.exists()  # a live builder's baton is never taken from it
    finally:
        holder.kill()
        holder.wait(timeout=10)
    done = _load(extensions)  # its builder gone, the baton is a leftover like any other
    assert done.returncode == 0 and not baton.exists(), done.stderr[-2000:]
