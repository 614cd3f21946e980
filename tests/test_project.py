"""Promises a newcomer relies on: the README's two commands, CI running them, images that build."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    code = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert [line.split()[:2] for line in code] == [["make", "demo"], ["make", "test"]]
    assert lines.index("```bash") < 4


def test_ci_starts_services_then_runs_test_then_demo() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pg_ctlcluster" in ci and "redis-server" in ci
    assert ci.index("make test") < ci.index("make demo")


def test_makefile_has_the_targets_the_readme_names() -> None:
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert {"demo", "test", "bench", "lint", "lock", "clean"} <= targets


def test_dependencies_are_pinned() -> None:
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for name in ("torch", "deepspeed", "transformers", "tokenizers", "fastapi", "celery", "sqlalchemy"):
        assert name in {k.lower() for k in pins}, name
    assert pins["torch"] == "2.13.0"


@pytest.mark.parametrize("dockerfile", ["api.Dockerfile", "worker.Dockerfile"])
def test_dockerfiles_copy_what_exists(dockerfile: str) -> None:
    for line in (ROOT / "docker" / dockerfile).read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:  # (--from: an earlier stage's output)
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{dockerfile}: COPY {src} does not exist"


def test_compose_file_is_consistent() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        if "build" in svc:
            context = (ROOT / "docker" / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file(), name
        for dep in svc.get("depends_on", []):
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        subprocess.run(
            ["docker", "compose", "-f", str(ROOT / "docker" / "compose.yaml"), "config", "-q"], check=True
        )


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_tests_cannot_reach_beyond_loopback() -> None:
    from pytest_socket import SocketConnectBlockedError

    with pytest.raises(SocketConnectBlockedError):
        socket.create_connection(("10.255.255.1", 80), timeout=1)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=1):
        pass  # loopback is allowed (PostgreSQL, Redis, our own servers)
    server.close()


def test_the_consoles_lock_file_installs_with_npm_ci() -> None:
    """`npm ci` (what `make console` runs on a clean clone) refuses a lock that lacks a package another one
    lists, even an optional one: vite 8.4.0 lists `napi-windows-process-start-time`, which the registry does
    not have, so its lock could never be complete (a checkout with node_modules built fine)."""
    import json

    console = ROOT / "service" / "console"
    lock = json.loads((console / "package-lock.json").read_text())
    pinned = json.loads((console / "package.json").read_text())
    packages = lock["packages"]
    assert packages[""]["dependencies"] == pinned["dependencies"]
    assert packages[""]["devDependencies"] == pinned["devDependencies"]
    for where, pkg in packages.items():
        for dep in {**pkg.get("dependencies", {}), **pkg.get("optionalDependencies", {})}:
            assert f"node_modules/{dep}" in packages or f"{where}/node_modules/{dep}" in packages, (
                where,
                dep,
            )
    assert all(
        "==" not in v and not v.startswith(("^", "~"))
        for v in {**pinned["dependencies"], **pinned["devDependencies"]}.values()
    )
