"""Bundled base models (the tiny models, SmolLM2 and its reward model) built on first use, by whichever
worker needs one first: a training worker before a job's step, an inference worker before serving it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from service.services import models as models_svc


def build_bundled(
    path: Path, *, every_s: float, tick: Callable[..., None], timeout_s: float = 3600.0
) -> None:
    """Build a bundled model (models_svc.build_args) into `path` in a child process (torch stays out of the
    caller), calling `tick(share done or None)` every `every_s` seconds meanwhile. One builder per path
    (a file lock, which dies with its holder), so a training and an inference worker asking at once build
    it once. At most `timeout_s` in all, waiting for another builder included; then an error says so."""
    from rlhf_engine import locks
    from rlhf_engine.models.tiny import PROGRESS_ENV
    from rlhf_engine.runtime.fencing import WATCH_ENV

    args = models_svc.build_args(path.name)  # (a ValueError for a name that is not bundled)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    lock = path.parent / f".{path.name}.lock"
    what = f"the build of base model {path.name} by another process"
    with locks.hold(lock, what=what, timeout_s=timeout_s, poll_s=min(every_s, 1.0), on_wait=lambda _: tick()):
        if (path / "config.json").is_file():  # another process built it while we waited
            return
        progress = path.parent / f".{path.name}.progress"
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf_engine.cli", *args, "--out", str(path), "--overwrite"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, PROGRESS_ENV: str(progress), WATCH_ENV: str(os.getpid())},
        )
        try:
            while True:  # bounded: the deadline
                try:
                    _, err = proc.communicate(timeout=every_s)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"building base model {path.name} took longer than {timeout_s:.0f} s "
                            "(RLHF_MODEL_BUILD_TIMEOUT_S); it was stopped"
                        ) from None
                    tick(_share(progress))
        except BaseException:
            proc.kill()
            proc.wait(timeout=60)
            raise
        finally:
            progress.unlink(missing_ok=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {path.name} failed: {err.decode(errors='replace')[-500:]}")


def _share(progress: Path) -> float | None:
    try:
        done, total = progress.read_text().split()
        return int(done) / max(int(total), 1)
    except (OSError, ValueError):
        return None
