"""Locks that die with their holder, and waits that end.

Every lock the project takes is an OS lock on an open file (`flock`): the kernel drops it when the
holding process exits, however it exits (SIGKILL included), so no lock outlives its holder and none is
ever broken by age. Every wait for one has a deadline and ends with an error that names what it waited
for and who held it. Stdlib only: the training worker and the API server import it without torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


class LockTimeoutError(TimeoutError):
    """A lock was not free within its bound; the message names the lock and its holder."""


def holders(path: Path) -> list[int]:
    """Processes of this host with `path` open (Linux `/proc/*/fd`); other users' processes, whose
    descriptors cannot be read, are not seen."""
    target = str(Path(path).resolve())
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        found.append(int(proc.name))
                        break
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def working_in(folder: Path) -> list[int]:
    """Processes of this host whose working directory is `folder` (a build's compilers run there)."""
    target = str(Path(folder).resolve())
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(proc / "cwd") == target:
                    found.append(int(proc.name))
    return found


def describe(pid: int) -> str:
    """`pid N (command line)` for messages, or `pid N` when it is gone or unreadable."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid} ({cmd[:160]})" if cmd else f"pid {pid}"


def _holder_note(f: IO[str]) -> str:
    with contextlib.suppress(OSError, ValueError):
        f.seek(0)
        info = json.loads(f.read() or "{}")
        if info.get("pid"):
            return f"; held by pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}"
    return ""


@contextlib.contextmanager
def hold(
    path: Path,
    *,
    what: str,
    timeout_s: float,
    shared: bool = False,
    poll_s: float = 0.1,
    on_wait: Callable[[float], Any] | None = None,
) -> Iterator[float]:
    """Hold an exclusive (or shared) `flock` on `path` for the `with` block; yields the seconds waited.

    Waits at most `timeout_s`, calling `on_wait(seconds waited)` every poll meanwhile (a heartbeat),
    then raises `LockTimeoutError` naming `what` and the holder. An exclusive holder writes its pid, host and
    start time into the file, for the next waiter's message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(path, "a+") as f:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        while True:  # bounded: raises past timeout_s
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited > timeout_s:
                    raise LockTimeoutError(
                        f"waited {waited:.0f} s for {what} ({path}){_holder_note(f)}; it is held by a live "
                        "process (a lock dies with its holder): end that process or raise the bound"
                    ) from None
                if on_wait is not None:
                    on_wait(waited)
                time.sleep(poll_s)
        waited = time.monotonic() - started
        if not shared:
            f.seek(0)
            f.truncate()
            f.write(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                )
            )
            f.flush()
        try:
            yield waited
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
