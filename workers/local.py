"""Running the service's processes on one machine: a free port, waiting for a server to answer, an API
key through `rlhf keys create`, and the event loop our servers run on. Used by `rlhf serve`, the
inference worker, `rlhf demo`, the benchmarks and the tests (one copy instead of one each)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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
