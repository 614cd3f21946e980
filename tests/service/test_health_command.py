"""`rlhf health api|inference|worker`: the images' HEALTHCHECK and the Kubernetes probes' exec fallback
(docker/, docker/kubernetes/) — 0 when the part answers, 1 with the reason when it does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.slurm import free_port
from tests.service.conftest import Stack, Workers


def health(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "health", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_each_part_answers_and_a_dead_one_does_not(e2e_stack: Stack, tmp_path: Path) -> None:
    ok = health(e2e_stack, "api", f"{e2e_stack.url}/healthz")
    assert ok.returncode == 0, ok.stderr
    dead = health(e2e_stack, "api", f"http://127.0.0.1:{free_port()}/healthz")
    assert dead.returncode == 1 and "unhealthy:" in dead.stderr
    # the e2e stack's training worker runs on this host and answers Celery's ping through Redis
    worker = health(e2e_stack, "worker")
    assert worker.returncode == 0, worker.stderr
    workers = Workers(e2e_stack, tmp_path)
    try:
        pid = workers.start()
        row = workers.row(pid)
        assert row is not None
        served = health(e2e_stack, "inference", row.address)
        assert served.returncode == 0, served.stderr
    finally:
        workers.stop()
    gone = health(e2e_stack, "inference", row.address)
    assert gone.returncode == 1 and "unhealthy:" in gone.stderr


@pytest.mark.parametrize("part", ["api", "inference"])
def test_a_port_nothing_listens_on_is_unhealthy(e2e_stack: Stack, part: str) -> None:
    target = f"http://127.0.0.1:{free_port()}/healthz" if part == "api" else f"127.0.0.1:{free_port()}"
    assert health(e2e_stack, part, target).returncode == 1
