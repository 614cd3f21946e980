"""No wait in the product code is unbounded (issue: a killed op build left a lock that a job waited on
for ever). A lint over the source, by the syntax tree:

- `while True:` loops end by a deadline or timeout they check, or say on their line why they end
  (`# bounded: …`);
- calls that block until something else happens — `subprocess.run/call/check_call/check_output`,
  `.wait()`, `.communicate()`, `.join()`, `.acquire()`, `.get()` on a queue — pass a timeout, or say on
  their line what bounds them;
- locks are taken only through `rlhf_engine/locks.py` (a blocking `fcntl.flock` elsewhere is refused),
  never by torch's file baton, never by PostgreSQL's blocking `pg_advisory_lock`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("rlhf_engine", "service", "workers")
BLOCKING_CALLS = {"run", "call", "check_call", "check_output"}  # of subprocess
BLOCKING_METHODS = {"wait", "communicate", "join", "acquire"}
MARK = "bounded:"


def _sources() -> list[Path]:
    return sorted(
        p for d in PRODUCT for p in (ROOT / d).rglob("*.py") if "gen" not in p.relative_to(ROOT).parts
    )


def _marked(lines: list[str], node: ast.expr) -> bool:
    """A `# bounded: why` comment on any line the node spans (a call may be split over lines), or as
    the whole line just above it."""
    first, last = node.lineno, node.end_lineno or node.lineno
    above = lines[first - 2].strip() if first > 1 else ""
    return above.startswith(f"# {MARK}") or any(MARK in lines[i - 1] for i in range(first, last + 1))


def _checks_a_bound(loop: ast.While) -> bool:
    for node in ast.walk(loop):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        if any(word in name.lower() for word in ("deadline", "timeout")):
            return True
    return False


def _has_timeout(call: ast.Call) -> bool:
    return any(k.arg in ("timeout", "timeout_s") for k in call.keywords) or bool(call.args)


def findings(rel: str, text: str) -> list[str]:
    """What in the source `text` of the file `rel` (relative to the checkout) waits without a bound."""
    lines = text.splitlines()
    out = []
    if "FileBaton" in text:
        out.append(f"{rel}: torch's FileBaton waits without a bound; use rlhf_engine.locks")
    if "pg_advisory_lock(" in text:
        out.append(
            f"{rel}: pg_advisory_lock waits without a bound; loop on pg_try_advisory_lock with a deadline"
        )
    tree = ast.parse(text)
    # `asyncio.wait_for(x.wait(), timeout=…)` bounds the call it wraps
    wrapped = {
        id(arg)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func).endswith("wait_for")
        and (len(node.args) > 1 or any(k.arg == "timeout" for k in node.keywords))
        for arg in node.args[:1]
    }
    for node in ast.walk(tree):
        if id(node) in wrapped:
            continue
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if (
            isinstance(node, ast.While)
            and isinstance(node.test, ast.Constant)
            and node.test.value is True
            and not _checks_a_bound(node)
            and MARK not in lines[node.lineno - 1]
        ):
            out.append(f"{where}: `while True` without a deadline it checks (or a '# {MARK} why' comment)")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr, owner = node.func.attr, node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else ""
        if owner_name == "fcntl" and attr == "flock" and rel != "rlhf_engine/locks.py":
            modes = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
            if "LOCK_NB" not in modes and "LOCK_UN" not in modes and not _marked(lines, node):
                out.append(f"{where}: a blocking flock; take locks with rlhf_engine.locks.hold (bounded)")
        elif _marked(lines, node):
            continue
        elif owner_name == "subprocess" and attr in BLOCKING_CALLS:
            if not any(k.arg == "timeout" for k in node.keywords):
                out.append(f"{where}: subprocess.{attr} without timeout= (or a '# {MARK} why' comment)")
        elif attr in BLOCKING_METHODS and not _has_timeout(node):
            out.append(f"{where}: .{attr}() without a timeout (or a '# {MARK} why' comment)")
        elif attr == "get" and "queue" in ast.unparse(owner).lower() and not _has_timeout(node):
            out.append(f"{where}: queue .get() without a timeout (or a '# {MARK} why' comment)")
    return out


def test_no_unbounded_wait_in_the_product() -> None:
    found = [f for path in _sources() for f in findings(path.relative_to(ROOT).as_posix(), path.read_text())]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("while True:\n    pass\n", 1),
        ("while True:  # bounded: the file ends\n    pass\n", 0),
        ("import subprocess\n# bounded: the step ends\nsubprocess.run(['x'])\n", 0),
        ("import time\ndeadline = 1\nwhile True:\n    if time.monotonic() > deadline:\n        break\n", 0),
        ("import subprocess\nsubprocess.run(['x'])\n", 1),
        ("import subprocess\nsubprocess.run(['x'], timeout=5)\n", 0),
        ("p.wait()\n", 1),
        ("p.wait(timeout=3)\n", 0),
        ("await asyncio.wait_for(stop.wait(), timeout=5)\n", 0),
        ("await asyncio.wait_for(stop.wait(), 5)\n", 0),
        ("await asyncio.wait_for(stop.wait())\n", 1),
        ("import fcntl\nfcntl.flock(f, fcntl.LOCK_EX)\n", 1),
        ("import fcntl\nfcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", 0),
        ("conn.execute('SELECT pg_advisory_lock(1)')\n", 1),
    ],
)
def test_the_lint_finds_what_it_should(source: str, found: int) -> None:
    assert len(findings("workers/probe.py", source)) == found, findings("workers/probe.py", source)
