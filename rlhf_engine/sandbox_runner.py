"""The first code a python grader's sandbox runs (`rlhf_engine.sandbox` bind-mounts this file read-only and
starts it with the venv's interpreter): set the process limits, then compile the tenant's source and
call its `grade(sample, item)` once per sample. Results go out on the original stdout, one JSON line per
sample; whatever the grader prints goes to stderr, which the parent keeps (bounded) as the details.

Standard library only, and nothing of this package: inside the sandbox only the interpreter, its
packages and this file exist."""

import json
import math
import os
import resource
import sys
import traceback


def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def _trace(e: BaseException) -> str:
    """The traceback from the tenant's code on (this runner's frame left out), its last 2,000 characters."""
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(e), e, tb))[-2000:].strip()


def main() -> None:
    job = json.loads(sys.stdin.read())
    limits = job["limits"]
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the grader's own prints join stderr, never the results
    sys.stdout = os.fdopen(1, "w", buffering=1)
    _limit(resource.RLIMIT_AS, limits["memory_bytes"])
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first: a clear cause
    _limit(resource.RLIMIT_FSIZE, limits["file_bytes"])
    _limit(resource.RLIMIT_NOFILE, 64)
    _limit(resource.RLIMIT_NPROC, limits["processes"])  # where the uid is not root's; else the cgroup
    _limit(resource.RLIMIT_CORE, 0)
    scope: dict = {"__name__": "grader"}
    try:
        exec(compile(job["source"], "grader.py", "exec"), scope)  # the sandbox is the point
        grade = scope["grade"]
    except BaseException as e:  # any failure of the tenant's module is reported, not raised
        out.write(json.dumps({"fatal": _trace(e)}) + "\n")
        return
    for i, (sample, item) in enumerate(job["samples"]):
        try:
            score = grade(sample, item)
            if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
                raise TypeError(f"grade() must return a finite number, not {score!r:.100}")
            out.write(json.dumps({"i": i, "score": float(score)}) + "\n")
        except BaseException as e:  # one sample's failure is that sample's error flag
            out.write(json.dumps({"i": i, "error": _trace(e)}) + "\n")


if __name__ == "__main__":
    main()
