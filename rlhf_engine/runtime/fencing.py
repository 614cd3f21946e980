"""One trainer per step folder, whatever dies: a watchdog, a writer lock and a fencing token.

Why: the training worker runs each step in a process of its own session (so that it can signal the
step's whole group). When the worker died (SIGKILL, the OOM killer, a container restart that keeps
the children) the step survived, re-parented to init, and kept training while the job was queued
again: five trainers once wrote one `step1_sft/` (metrics twice, checkpoints overwritten, cost
accrued five times). Three guards, each enough for the common case and together for the races:

- **watchdog** — a process started with `RLHF_WATCH_PID` watches that process (a pidfd, so a reused
  pid cannot fool it). When it ends, the step stops as on SIGTERM (checkpoint at the next step
  boundary, then exit) and leaves at once after `RLHF_ORPHAN_GRACE_S`. The ranks of a launched run
  watch the step's top process, which watches the worker.
- **writer lock** — the step's top process holds an exclusive `flock` on `STEP_DIR/.writer.lock`
  for its whole life, and the ranks of a launched run a shared one on `.ranks.lock`. A new attempt
  waits for a lingering holder and, after `wait_s`, ends it (SIGTERM, then SIGKILL).
- **fencing token** — the worker writes the attempt number the database granted into
  `STEP_DIR/.fence` before it starts the step and passes the same number as `RLHF_ATTEMPT`. Before
  every checkpoint, metric line, event, model and summary the step compares the two: a step whose
  attempt is no longer current raises `SupersededError` and stops without writing.

Stdlib only: the worker imports this module too (it writes the fence), and it must not load torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rlhf_engine import locks

logger = logging.getLogger(__name__)

ATTEMPT_ENV = "RLHF_ATTEMPT"  # the fencing token of this step process (set by the training worker)
WATCH_ENV = "RLHF_WATCH_PID"  # the process whose end ends this one
GRACE_ENV = "RLHF_ORPHAN_GRACE_S"  # seconds an orphaned step gets to checkpoint before it leaves
FENCE_FILE = ".fence"
WRITER_LOCK = ".writer.lock"
RANKS_LOCK = ".ranks.lock"
EXIT_SUPERSEDED = 76  # another attempt owns the folder now: not finished, not failed, not to be rerun
EXIT_ORPHANED = 77  # the watched process ended and the step did not stop within its grace


class SupersededError(Exception):
    """A newer attempt of the job owns this step folder; this process must not write to it."""


# ---------------------------------------------------------------------------- fencing token


def read_fence(step_dir: Path) -> int | None:
    try:
        return int((step_dir / FENCE_FILE).read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return None


def write_fence(step_dir: Path, attempt: int) -> int:
    """Raise the folder's fence to `attempt` (never lowers it: a stale worker cannot take a folder
    back). Returns the fence now in force."""
    step_dir.mkdir(parents=True, exist_ok=True)
    with locks.hold(step_dir / f"{FENCE_FILE}.lock", what="the step folder's fence", timeout_s=60):
        current = read_fence(step_dir)
        if current is not None and current >= attempt:
            return current
        tmp = step_dir / f"{FENCE_FILE}.{os.getpid()}"
        tmp.write_text(f"{attempt}\n")
        os.replace(tmp, step_dir / FENCE_FILE)
        return attempt


@dataclass(frozen=True)
class _Fence:
    step_dir: Path
    attempt: int


_fence: _Fence | None = None  # set while this process writes a step folder under a token


def _set_fence(step_dir: Path) -> None:
    global _fence
    token = os.environ.get(ATTEMPT_ENV)
    _fence = _Fence(step_dir, int(token)) if token else None


def superseded() -> bool:
    """True when this process writes under a token and the folder's fence has moved past it."""
    if _fence is None:
        return False
    current = read_fence(_fence.step_dir)
    return current is not None and current > _fence.attempt


def check() -> None:
    """Call before every write to the step folder."""
    if superseded():
        assert _fence is not None
        raise SupersededError(
            f"attempt {_fence.attempt} of {_fence.step_dir} was superseded by attempt "
            f"{read_fence(_fence.step_dir)}; stopping without writing"
        )


# ---------------------------------------------------------------------------- writer lock


def _holder(lock_path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(lock_path.read_text() or "{}"))
    except (OSError, ValueError):
        return {}


def _is_ours(pid: int) -> bool:
    """Only a process running our CLI is ever signalled (never a pid that happens to be reused)."""
    try:
        return b"rlhf_engine" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _acquire(f: object, lock_path: Path, mode: int, *, wait_s: float, end_holder: bool) -> float:
    """Take the flock; returns the seconds waited. Past `wait_s` the holder is ended (when it is a
    process of ours on this host) or an error names it."""
    started = time.monotonic()
    signalled: float | None = None
    while True:  # bounded: ends the holder past wait_s, raises past wait_s * 2 + 30
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)  # type: ignore[arg-type]
            return time.monotonic() - started
        except BlockingIOError:
            pass
        waited = time.monotonic() - started
        holder = _holder(lock_path) if end_holder else {}
        pid = int(holder.get("pid", 0) or 0)  # type: ignore[call-overload]
        local = holder.get("host") == socket.gethostname()
        if waited > wait_s and end_holder and pid and local and _is_ours(pid):
            if signalled is None:
                logger.warning(
                    "%s: ending the previous holder (pid %d) after %.0f s", lock_path.parent, pid, waited
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                signalled = time.monotonic()
            elif time.monotonic() - signalled > 10:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        elif waited > wait_s * 2 + 30:
            raise RuntimeError(
                f"{lock_path.parent} is still written by another process ({holder or 'unknown'}) "
                f"after {waited:.0f} s; end it, then run the step again"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def writer(step_dir: Path, *, wait_s: float = 120.0) -> Iterator[float]:
    """Hold the step folder for this process's step (the top process of a launched run, or the
    only one). Waits for a previous holder and its ranks; yields the seconds waited."""
    step_dir.mkdir(parents=True, exist_ok=True)
    path = step_dir / WRITER_LOCK
    with open(path, "a+") as f:
        waited = _acquire(f, path, fcntl.LOCK_EX, wait_s=wait_s, end_holder=True)
        f.seek(0)
        f.truncate()
        f.write(
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "attempt": os.environ.get(ATTEMPT_ENV)}
            )
        )
        f.flush()
        # ranks of an earlier launched run outlive their top process for up to their grace
        with open(step_dir / RANKS_LOCK, "a+") as ranks:
            waited += _acquire(ranks, step_dir / RANKS_LOCK, fcntl.LOCK_EX, wait_s=wait_s, end_holder=False)
            fcntl.flock(ranks, fcntl.LOCK_UN)
        _set_fence(step_dir)
        check()
        try:
            yield waited
        finally:
            _set_fence_none()
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def rank(step_dir: Path) -> Iterator[None]:
    """A rank of a launched run: a shared hold on the folder for as long as this process trains."""
    # the top process holds it exclusively only while it waits for an earlier run's ranks to leave
    with locks.hold(step_dir / RANKS_LOCK, what="the step folder's ranks lock", timeout_s=600, shared=True):
        _set_fence(step_dir)
        try:
            yield
        finally:
            _set_fence_none()


def _set_fence_none() -> None:
    global _fence
    _fence = None


# ---------------------------------------------------------------------------- watchdog


def _wait_for_end(pid: int) -> bool:
    """Block until `pid` ends; False if it had ended already."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):  # no pidfd (an old kernel): poll the pid instead
        while True:  # bounded: the watched process's life (the watchdog's own thread)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.5)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll(1000):
            pass
    finally:
        os.close(fd)
    return True


def start_watchdog() -> None:
    """If `RLHF_WATCH_PID` names a process, stop this one when that one ends: SIGTERM to itself first
    (a training step checkpoints at its next boundary and exits), then, after the grace, leave."""
    watched = os.environ.get(WATCH_ENV)
    if not watched:
        return
    grace = float(os.environ.get(GRACE_ENV, "60"))
    pid = int(watched)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        print(f"rlhf: the process that started this step (pid {pid}) is gone; not starting", file=sys.stderr)
        os._exit(EXIT_ORPHANED)

    def watch() -> None:
        _wait_for_end(pid)
        print(
            f"rlhf: the process that started this step (pid {pid}) is gone; stopping (checkpoint at the next "
            f"step boundary, at most {grace:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        print("rlhf: the orphaned step did not stop within its grace; leaving", file=sys.stderr, flush=True)
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="rlhf-watchdog", daemon=True).start()
