"""Python graders' sandbox: the tenant's `grade()` runs, and every way out it tries is contained — an
error flag on the sample, and the process that ran it (the service) unharmed. Real bubblewrap, real
limits; nothing mocked."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_engine import graders, sandbox

LIMITS = sandbox.Limits(
    memory_bytes=1 << 30, cpu_seconds=2, wall_seconds=15, output_bytes=64 << 10, processes=32
)
SECRET = "rlhf-sandbox-probe-5f1e"


def grade(source: str, n: int = 1, limits: sandbox.Limits = LIMITS) -> list[graders.Graded]:
    g = graders.parse({"type": "python", "name": "p", "source": source})
    return graders.grade_batch(g, ["an answer"] * n, [{}] * n, graders.Context(limits=limits))


def runtime_error(out: graders.Graded) -> str:
    assert out.score == 0.0 and list(out.errors) == ["python_grader_runtime_error"], out
    return out.errors["python_grader_runtime_error"]


@pytest.fixture
def secret_env() -> Iterator[None]:
    os.environ["RLHF_SANDBOX_PROBE"] = SECRET
    yield
    del os.environ["RLHF_SANDBOX_PROBE"]


def processes() -> int:
    return len([p for p in os.listdir("/proc") if p.isdigit()])


def test_grade_sees_the_sample_and_item_and_the_grader_image_packages() -> None:
    source = """
import json, numpy, scipy, sympy, pandas, rapidfuzz, sklearn, rouge_score, deepdiff, jsonschema
import pydantic, yaml, nltk, sqlparse

def grade(sample, item):
    jsonschema.validate(sample["output_json"], {"type": "object", "required": ["city"]})
    same = rapidfuzz.fuzz.ratio(sample["output_json"]["city"], item["reference"]) / 100
    return float(numpy.mean([same, sympy.Integer(1)]))
"""
    g = graders.parse({"type": "python", "name": "p", "source": source})
    # importing the whole image (scipy, scikit-learn, pandas …) takes seconds of CPU on a cold, busy machine
    roomy = dataclasses.replace(LIMITS, cpu_seconds=30, wall_seconds=90)
    out = graders.grade_batch(
        g,
        ['{"city": "Paris"}', '{"town": "Paris"}'],
        [{"reference": "Paris"}] * 2,
        graders.Context(limits=roomy),
    )
    assert out[0].score == 1.0 and not out[0].errors
    assert "'city' is a required property" in runtime_error(out[1])  # one sample's error, not the batch's
    assert grade("def grade(sample, item):\n    return len(sample['choices'])", 3)[2].score == 1.0


def test_what_grade_returns_must_be_a_finite_number() -> None:
    for value in ("'1'", "float('nan')", "None", "True"):
        assert "finite number" in runtime_error(grade(f"def grade(s, i):\n    return {value}")[0])
    assert "boom" in runtime_error(grade("def grade(s, i):\n    raise ValueError('boom')")[0])
    outs = grade("raise SystemExit(3)\ndef grade(s, i):\n    return 1", 2)
    assert all("module failed" in runtime_error(o) for o in outs)


def test_no_network_not_even_the_hosts_loopback() -> None:
    with socket.socket() as server:  # a real listener on this host's loopback
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        source = (
            f"import socket\ndef grade(s, i):\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    return 1"
        )
        assert "Connection refused" in runtime_error(grade(source)[0])
    dns = "import socket\ndef grade(s, i):\n    return len(socket.getaddrinfo('pypi.org', 443))"
    runtime_error(grade(dns)[0])


def test_no_environment_no_secrets(secret_env: None) -> None:
    source = """
import os
def grade(s, i):
    raise RuntimeError(repr(os.environ) + open('/proc/1/environ').read() + open('/proc/self/environ').read())
"""
    details = runtime_error(grade(source)[0])
    assert SECRET not in details and "RLHF_" not in details and "DATABASE_URL" not in details
    assert "PATH" in details  # it did read them: they hold nothing


def test_no_service_files_and_a_read_only_system(tmp_path: Path) -> None:
    db = tmp_path / "rlhf.db"
    db.write_text("the service's data")
    assert "No such file" in runtime_error(
        grade(f"def grade(s, i):\n    return len(open({str(db)!r}).read())")[0]
    )
    outside = tmp_path / "written.txt"
    for path in (outside, Path("/usr/lib/evil"), Path("/etc/evil")):
        details = runtime_error(
            grade(f"def grade(s, i):\n    open({str(path)!r}, 'w').write('x')\n    return 1")[0]
        )
        assert "Read-only file system" in details or "No such file" in details
        assert not path.exists()
    own = (
        "def grade(s, i):\n    open('/tmp/mine', 'w').write('x' * 10)\n"
        "    return len(open('/tmp/mine').read())"
    )
    assert grade(own)[0].score == 10.0  # its private /tmp works, and is gone after
    big = "def grade(s, i):\n    open('/tmp/big', 'wb').write(b'x' * (200 << 20))\n    return 1"
    runtime_error(grade(big)[0])


def test_a_fork_bomb_is_stopped_and_leaves_no_process() -> None:
    before = processes()
    started = time.monotonic()
    source = "import os\ndef grade(s, i):\n    while True:\n        os.fork()"
    runtime_error(grade(source)[0])
    assert time.monotonic() - started < LIMITS.wall_seconds + 5
    time.sleep(0.5)
    assert processes() <= before + 2  # (the test runner's own helpers may come and go)


def test_memory_cpu_and_output_limits() -> None:
    assert "MemoryError" in runtime_error(
        grade("def grade(s, i):\n    x = bytearray(10 << 30)\n    return 1")[0]
    )
    started = time.monotonic()
    details = runtime_error(grade("def grade(s, i):\n    while True:\n        pass")[0])
    assert "CPU-time limit" in details and time.monotonic() - started < 10
    quick = dataclasses.replace(LIMITS, wall_seconds=2)
    sleeper = grade(
        "import time\ndef grade(s, i):\n    time.sleep(3600)", 3, quick
    )  # no CPU used: the wall clock
    assert all("wall-clock limit" in runtime_error(o) for o in sleeper)
    started = time.monotonic()
    details = runtime_error(
        grade("import sys\ndef grade(s, i):\n    while True:\n        sys.stdout.write('x' * 65536)")[0]
    )
    assert "output limit" in details and time.monotonic() - started < 10 and len(details) < 2000


def test_ctypes_into_libc_and_killing_the_parent_harm_nothing_outside(tmp_path: Path) -> None:
    witness = subprocess.Popen(["sleep", "60"])  # a process of ours it might try to kill
    libc = "import ctypes, os, time\nlibc = ctypes.CDLL(None)\n"
    try:
        # kill(-1): every process it may signal — only itself and the sandbox's init exist for it
        kill_all = libc + "def grade(s, i):\n    libc.kill(-1, 9)\n    return 1"
        assert grade(kill_all)[0].score == 1.0
        own_group = libc + "def grade(s, i):\n    libc.kill(0, 9)\n    return 1"
        assert "SIGKILL" in runtime_error(grade(own_group, 2)[0])
        segfault = libc + "def grade(s, i):\n    return ctypes.string_at(0)"
        assert "SIGSEGV" in runtime_error(grade(segfault)[0])
        system = libc + f"def grade(s, i):\n    return libc.system(b'touch {tmp_path}/pwned') + 1"
        assert grade(system)[0].score > 1  # touch failed: that folder does not exist in there
        parent = (
            libc
            + "def grade(s, i):\n    os.kill(os.getppid(), 9)\n    os.kill(1, 9)\n"
            + "    time.sleep(0.2)\n    return 2"
        )
        assert grade(parent)[0].score == 2.0  # its init ignores signals from inside
        pids = "import os\ndef grade(s, i):\n    return len([p for p in os.listdir('/proc') if p.isdigit()])"
        assert grade(pids)[0].score <= 3  # its init and itself: no process of the host is visible
        assert witness.poll() is None and not (tmp_path / "pwned").exists()
    finally:
        witness.kill()
        witness.wait()
