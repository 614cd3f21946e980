"""Promises a newcomer relies on: the README's two commands, CI running them, images that build."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import unicodedata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    code = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert [line.split()[:2] for line in code] == [["make", "demo"], ["make", "test"]]
    assert lines.index("```bash") < 4


def test_readme_is_a_front_door() -> None:
    """The README is the two commands, a short tour and the architecture; reference and measurements
    live in docs/ (built by `make docs`)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move reference or measurements to docs/"


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (what mkdocs uses) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def _links(text: str) -> list[str]:
    """Targets of inline links and images, outside fenced code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def test_relative_links_in_the_readme_and_docs_point_at_files_that_exist() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 10
    broken = []
    for page in pages:
        for target in _links(page.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve()
            where = f"{page.relative_to(ROOT)}: {target}"
            if not file.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and file.suffix == ".md":
                prose = re.sub(r"^```.*?^```", "", file.read_text(), flags=re.M | re.S)
                headings = re.findall(r"^#{1,6} +(.+?) *$", prose, flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{where} (no such heading)")
    assert broken == []


def test_ci_starts_services_then_runs_lint_docs_test_then_demo() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pg_ctlcluster" in ci and "redis-server" in ci
    assert "set -euo pipefail" in ci  # a finding of lint or a warning of docs stops CI
    assert ci.index("make lint") < ci.index("make docs") < ci.index("make test") < ci.index("make demo")
    lint = (ROOT / "Makefile").read_text().split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check ." in lint and "ruff format --check ." in lint and "mypy" in lint


def test_makefile_has_the_targets_the_readme_names() -> None:
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert {"demo", "test", "bench", "lint", "lock", "clean", "docs"} <= targets


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
                if src.startswith("--"):  # a flag (--chown=…)
                    continue
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


def _readme_blocks() -> str:
    text = (ROOT / "README.md").read_text()
    return "\n".join(re.findall(r"```(?:bash|python)\n(.*?)```", text, flags=re.S))


def test_the_readme_tour_names_commands_routes_and_rpcs_that_exist() -> None:
    """Every `rlhf …` command, REST route and gRPC method the README's tour uses is one the code has."""
    import subprocess
    import sys

    from service.api.app import create_app
    from service.settings import Settings

    blocks = _readme_blocks()
    commands = set(re.findall(r"^(?:export \w+=\$\()?rlhf ([a-z]+(?: [a-z]+)?)", blocks, flags=re.M))
    assert {"serve", "keys create"} <= commands, commands
    for command in sorted(commands):
        done = subprocess.run(
            [sys.executable, "-m", "workers.cli", *command.split(), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, (command, done.stderr[-500:])
    app = create_app(Settings(database_url="sqlite://"), run_migrations=False)
    routes = set(app.openapi()["paths"])
    used = set(re.findall(r"localhost:8000(/v1/[\w/{}.…-]+)", blocks))
    assert used, blocks
    for path in used:
        concrete = path.split("?")[0].replace("ftjob-…", "ftjob-x")  # the tour's placeholder id
        assert any(re.fullmatch(re.sub(r"\{\w+\}", "[^/]+", route), concrete) for route in routes), (
            path,
            sorted(routes),
        )
    protos = "\n".join(p.read_text() for p in (ROOT / "proto").rglob("*.proto"))
    rpcs = {
        (service, rpc)
        for service, body in re.findall(r"^service (\w+) \{(.*?)^\}", protos, flags=re.S | re.M)
        for rpc in re.findall(r"rpc (\w+)\(", body)
    }
    used_rpcs = set(re.findall(r"rlhf\.v1\.(\w+)/(\w+)", blocks))
    assert used_rpcs and used_rpcs <= rpcs, sorted(used_rpcs - rpcs)
