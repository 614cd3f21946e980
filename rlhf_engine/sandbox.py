"""Python graders run the tenant's code; this runs it where it can harm nothing: a bubblewrap sandbox.

Each batch of samples gets a fresh process under `bwrap` (Debian's `bubblewrap`, the sandbox Flatpak
uses) with
    namespaces   new user, pid, network, ipc, uts and cgroup namespaces: no network (only its own
                 loopback), only its own processes visible, no capabilities, no further user namespaces
    filesystem   a new root holding only /usr, /lib*, /bin, /sbin, the interpreter and its packages
                 (read-only), a private /tmp (tmpfs, `tmp_bytes`), fresh /dev and /proc; nothing of the
                 service (its data, database, keys) exists inside
    environment  empty, but PATH, HOME=/tmp and one thread per math library; bubblewrap itself starts
                 with that environment, so even /proc/1/environ (its reaper) holds no secret
    limits       address space, CPU seconds, file size, open files, core dumps (setrlimit, set by the
                 runner before the tenant's code exists); processes by a pids cgroup (and memory by a
                 memory cgroup) when this host lets us create one, else RLIMIT_NPROC, which binds every
                 uid but root's: as root without a cgroup the sandbox refuses to start
    parent side  a wall-clock deadline, a cap on what it prints, and the whole process group killed at
                 the end; --die-with-parent takes it down if the service dies first.

A sample whose grader raises, returns a non-number, runs out of time or memory, or prints too much gets
an error (its score is 0 and the caller sets OpenAI's `python_grader_runtime_error`); a sandbox that
cannot start is a server error (`python_grader_server_error`). Nothing in here raises for what the
tenant's code does.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUNNER = Path(__file__).with_name("sandbox_runner.py")
INSIDE_RUNNER = "/grader/runner.py"
MAX_SOURCE_BYTES = 256 * 1024  # OpenAI's limit on a python grader's source
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Limits:
    """What one sandboxed batch may use (defaults: OpenAI's grader image is 2 GB of memory)."""

    memory_bytes: int = 2 << 30
    cpu_seconds: int = 30
    wall_seconds: float = 60.0
    output_bytes: int = 1 << 20  # stdout + stderr the grader may print
    file_bytes: int = 64 << 20  # the largest file it may write (in its /tmp)
    tmp_bytes: int = 64 << 20
    processes: int = 32  # threads count too (numpy's, the interpreter's)


@dataclass
class Outcome:
    """One sample's grade: a score, or an error (`server` when the sandbox itself failed)."""

    score: float = 0.0
    error: str | None = None
    server: bool = False


def unavailable() -> str | None:
    """Why python graders cannot run on this host, or None when they can."""
    if sys.platform != "linux":
        return "python graders need Linux namespaces (bubblewrap); this host is not Linux"
    if shutil.which("bwrap") is None:
        return (
            "python graders need bubblewrap: install Debian's bubblewrap package (apt-get install bubblewrap)"
        )
    if os.geteuid() == 0 and _cgroup_dir("pids") is None:
        return (
            "python graders cannot limit processes here: the service runs as root (RLIMIT_NPROC does "
            "not bind root) and cannot create a pids cgroup; run the service as another user"
        )
    return None


def _cgroup_dir(controller: str) -> Path | None:
    """A cgroup v1 controller folder we may create children in, or None."""
    base = CGROUP_ROOT / controller
    if not base.is_dir() or not os.access(base, os.W_OK):
        return None
    return base


class _Cgroups:
    """This batch's pids (and memory) cgroups, created when the host lets us, removed after."""

    def __init__(self, limits: Limits) -> None:
        self.dirs: list[Path] = []
        name = f"rlhf-grader-{uuid.uuid4().hex[:12]}"
        for controller, setting, value in (
            ("pids", "pids.max", limits.processes),
            ("memory", "memory.limit_in_bytes", limits.memory_bytes),
        ):
            base = _cgroup_dir(controller)
            if base is None:
                continue
            try:
                (base / name).mkdir()
                (base / name / setting).write_text(str(value))
            except OSError:
                continue
            self.dirs.append(base / name)

    def join_command(self) -> list[str]:
        """A shell prefix that moves itself into the cgroups, then execs the sandbox."""
        if not self.dirs:
            return []
        moves = " && ".join(f"echo $$ > {d / 'cgroup.procs'}" for d in self.dirs)
        return ["/bin/sh", "-c", f'{moves} && exec "$@"', "sh"]

    def close(self) -> None:
        for d in self.dirs:
            for _ in range(50):  # the killed processes leave within moments
                try:
                    for pid in (d / "cgroup.procs").read_text().split():
                        os.kill(int(pid), signal.SIGKILL)
                    d.rmdir()
                    break
                except ProcessLookupError:
                    continue
                except OSError:
                    time.sleep(0.02)


def _command(limits: Limits) -> list[str]:
    prefixes = sorted({sys.prefix, sys.base_prefix, os.path.realpath(sys.base_prefix)})
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "65534", "--gid", "65534"]
    cmd += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    # the private /tmp first: the interpreter's own folders may lie under /tmp (a checkout there), and a
    # later tmpfs would hide their binds
    cmd += ["--size", str(limits.tmp_bytes), "--tmpfs", "/tmp"]
    for path in ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    for prefix in prefixes:
        if not prefix.startswith("/usr/"):
            cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--ro-bind", str(RUNNER), INSIDE_RUNNER]
    cmd += ["--dev", "/dev", "--proc", "/proc"]
    cmd += ["--chdir", "/tmp"]
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    python = os.path.join(sys.prefix, "bin", "python3")
    return cmd + ["--", python, "-I", INSIDE_RUNNER]


def _once(source: str, samples: list[tuple[Any, Any]], limits: Limits) -> tuple[dict[int, Outcome], str]:
    """Run one sandbox over `samples`; the outcomes it reported by index, and why it ended early ('' if
    it did not)."""
    groups = _Cgroups(limits)
    if os.geteuid() == 0 and not any(d.parent.name == "pids" for d in groups.dirs):
        groups.close()
        return {}, "server: " + (unavailable() or "cannot create a pids cgroup for the sandbox")
    job = json.dumps({"source": source, "samples": samples, "limits": asdict(limits)}).encode()
    try:
        proc = subprocess.Popen(
            groups.join_command() + _command(limits),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin"},  # bubblewrap's own environment: its reaper is /proc/1 inside
            start_new_session=True,
            close_fds=True,
        )
    except OSError as e:
        groups.close()
        return {}, f"server: cannot start the sandbox ({e})"
    outcomes: dict[int, Outcome] = {}
    printed = bytearray()
    results = b""
    why = ""
    deadline = time.monotonic() + limits.wall_seconds
    try:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(job)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, "out")
            sel.register(proc.stderr, selectors.EVENT_READ, "err")
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f"did not finish within {limits.wall_seconds:g} s (the wall-clock limit)"
                    break
                for key, _ in sel.select(timeout=min(left, 1.0)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    if key.data == "out":
                        results += chunk
                        if len(results) > limits.output_bytes + 64 * len(samples) + 1024:
                            why = f"printed more than {limits.output_bytes} bytes (the output limit)"
                    else:
                        printed += chunk
                        if len(printed) > limits.output_bytes:
                            why = f"printed more than {limits.output_bytes} bytes (the output limit)"
                if why:
                    break
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()  # bounded: SIGKILL to its whole group just now
        groups.close()
    for line in results.decode(errors="replace").splitlines():
        try:
            got = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(got, dict):
            continue
        if "fatal" in got:
            return {}, f"the grader's module failed: {str(got['fatal']).strip()}"
        i = got.get("i")
        if isinstance(i, int) and 0 <= i < len(samples) and i not in outcomes:
            if isinstance(got.get("score"), float):
                outcomes[i] = Outcome(score=got["score"])
            else:
                outcomes[i] = Outcome(error=str(got.get("error", "no score")).strip())
    if not why and len(outcomes) < len(samples):
        code = proc.returncode
        if code is not None and code > 128:  # bubblewrap's reaper passes on a death by signal as 128 + n
            code = 128 - code
        if code is not None and code < 0 and -code in signal.valid_signals():
            hint = {signal.SIGXCPU: " (the CPU-time limit)", signal.SIGKILL: ""}.get(
                signal.Signals(-code), ""
            )
            why = f"was killed by {signal.Signals(-code).name}{hint}"
        elif code == 1 and printed.startswith(b"bwrap:"):
            why = "server: " + printed.decode(errors="replace").strip()
        else:
            why = f"exited (status {code}) before grading every sample"
    tail = printed.decode(errors="replace")[-1000:].strip()
    if why and tail and not why.startswith("server:"):
        why += f"; its last output: {tail}"
    return outcomes, why


def grade(source: str, samples: list[tuple[Any, Any]], limits: Limits | None = None) -> list[Outcome]:
    """Each (sample, item) pair's outcome under `grade(sample, item)` from `source`. A sample that kills
    its sandbox is charged with the error and the rest go on in a fresh one, unless it ran out of time
    (then every remaining sample would too) or the sandbox failed three times."""
    limits = limits or Limits()
    if (reason := unavailable()) is not None:
        return [Outcome(error=reason, server=True) for _ in samples]
    done: list[Outcome] = []
    restarts = 0
    while len(done) < len(samples):
        outcomes, why = _once(source, samples[len(done) :], limits)
        n = 0
        while n in outcomes:  # the unbroken run from the first sample
            done.append(outcomes[n])
            n += 1
        if len(done) == len(samples):
            break
        server = why.startswith("server: ")
        error = Outcome(error=why.removeprefix("server: ") or "no score", server=server)
        done.append(error)
        restarts += 1
        if server or "wall-clock" in why or "module failed" in why or restarts >= 3:
            done += [error] * (len(samples) - len(done))
    return done
