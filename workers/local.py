"""Running the service's processes on one machine: `rlhf serve --all-in-one` started and stopped, a
free port, waiting for a server to answer, an API key through `rlhf keys create`, and the event loop
our servers run on. Used by `rlhf serve`, the inference worker, `rlhf demo`, the benchmarks and the tests
(one copy instead of one each)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def start_all_in_one(data_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """`rlhf serve --all-in-one` (SQLite, a Celery worker on the filesystem transport) with the settings
    of `env`, on free loopback ports, in its own process group, logging to `data_dir/server.log`:
    (the process, its base URL). Stop it with `stop_server`."""
    from rlhf_engine.runtime.distributed import free_port

    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "server.log", "ab") as log:  # the child keeps its own descriptor
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "serve",
                "--all-in-one",
                "--port",
                str(port),
                "--grpc-port",
                str(free_port()),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return server, f"http://127.0.0.1:{port}"


def stop_server(server: subprocess.Popen[bytes], grace_s: float = 90) -> None:
    """SIGTERM (the server stops its workers), then SIGKILL to its whole group after `grace_s`."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def wait_healthy(base: str, proc: subprocess.Popen[Any], *, timeout_s: float = 60) -> bool:
    """Until `base`/healthz answers 200 (True), or the process exits or the time runs out (False)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def create_key(env: dict[str, str], tenant: str, name: str = "") -> str:
    """A new API key for `tenant` in the service whose settings are in `env` (`rlhf keys create`)."""
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "keys", "create", "--tenant", tenant, "--name", name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout.strip()


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where installed (faster sockets and wake-ups), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional (not on Windows)
        return asyncio.run(main)
    return uvloop.run(main)
