"""Running `rlhf` as a user or the training worker does: a subprocess, launcher variables cleared."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf_engine.runtime.launch import LAUNCH_VARS

SMALL = ["--max-seq-len", "128", "--eval-max-rows", "200"]


def rlhf(
    *args: object, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`rlhf <args>` in a fresh process (no launcher's variables inherited; `env` added)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "rlhf_engine.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def rlhf_ok(*args: object, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = rlhf(*args, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def kill_after_first_checkpoint(args: Sequence[object], step_dir: Path) -> int:
    """Start `rlhf <args>`, SIGKILL its whole process group as soon as its first checkpoint is
    recorded (mid-way through the following steps); return that checkpoint's global step."""
    import json
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_engine.cli", *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    events = step_dir / "events.jsonl"
    deadline = time.monotonic() + 120
    while not (events.is_file() and "checkpoint_saved" in events.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the run ended before its first checkpoint"
        )
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (step_dir / "summary.json").exists()
    saved = [json.loads(line) for line in events.read_text().splitlines() if '"checkpoint_saved"' in line]
    return max(e["data"]["global_step"] for e in saved)


# a short SFT step's options (small batches and sequences, no checkpoints, a small eval)
FAST = [
    "--per-device-train-batch-size",
    4,
    "--checkpoint-interval",
    0,
    "--max-seq-len",
    128,
    "--eval-max-rows",
    32,
]
