"""DeepSpeed's JIT-compiled ops: built once per machine, one builder at a time, never waiting on a dead one.

On CPU DeepSpeed compiles a shared-memory communication op on the first `init_distributed`, and the CPU
Adam op for optimizer offload (DeepSpeedCPUAdam) (~45 s each). torch caches the result in
`TORCH_EXTENSIONS_DIR` (pointed into the rlhf cache, so a build is paid once) and guards each build
folder with a "baton": a `lock` file created when a build starts and removed when it ends. A builder
killed halfway leaves its baton, and every later build of that op waits on it with no limit.

So every build and load goes through `load_ops`, which holds our own lock on the extensions folder (an
OS lock: it dies with its holder) and, before loading, removes each baton that no live process holds
open — with our lock held, no builder of ours is running, so such a baton is a dead builder's. A baton
that a live process holds (a build outside this project, in the same folder) is waited for, bounded.
Loaded ops stay in DeepSpeed's in-process table, so the loads DeepSpeed makes itself later (inside
`init_distributed`, DeepSpeedCPUAdam) never touch a baton.

    python -m rlhf_engine.runtime.ops        # what `make` runs after installing; a worker image's build step
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from rlhf_engine import locks
from rlhf_engine.paths import cache_dir

logger = logging.getLogger(__name__)

# The accelerator's builder class names (deepspeed.accelerator.*_accelerator.get_op_builder) → the
# op's name, which is its build folder under TORCH_EXTENSIONS_DIR.
OP_NAMES = {"ShareMemCommBuilder": "deepspeed_shm_comm", "CPUAdamBuilder": "cpu_adam"}
CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")
BUILD_LOCK = ".rlhf-build.lock"
BATON = "lock"  # torch's file baton in each build folder (torch/utils/file_baton.py)
BUILD_TIMES = ".rlhf-build-times.json"  # seconds each op took to build here, for "usually N s"
DEFAULT_BUILD_S = 60.0  # an op never built on this machine (45 s measured on 2 cores)
LOAD_S = 3.0  # loading ops already built
TIMEOUT_ENV = "RLHF_OPS_TIMEOUT_S"  # the longest wait for another builder (default 1800 s)


def extensions_dir() -> Path:
    """`TORCH_EXTENSIONS_DIR`, set to `<rlhf cache>/torch_extensions` unless already set."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_dir("torch_extensions"))
    path = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def _timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "1800"))


def default_names() -> tuple[str, ...]:
    """The ops a worker prebuilds (torch-free guess of the accelerator): every CPU op on a machine
    without an NVIDIA driver, CPU Adam (ZeRO-Offload) on one with it."""
    accelerator = os.environ.get("DS_ACCELERATOR") or (
        "cuda" if Path("/proc/driver/nvidia").exists() else "cpu"
    )
    return CPU_OPS if accelerator == "cpu" else ("CPUAdamBuilder",)


def needed(*, offload: bool) -> tuple[str, ...]:
    """The ops a training step loads: the shared-memory collectives on DeepSpeed's CPU accelerator, CPU
    Adam for optimizer offload."""
    from deepspeed.accelerator import get_accelerator

    cpu = get_accelerator().device_name() == "cpu"
    return (("ShareMemCommBuilder",) if cpu else ()) + (("CPUAdamBuilder",) if offload else ())


def is_built(names: Iterable[str]) -> bool:
    """Whether each op has a library in the cache and no baton (torch-free: the worker asks)."""
    root = extensions_dir()
    for name in names:
        folder = root / OP_NAMES.get(name, name)
        if (folder / BATON).exists() or not any(folder.glob("*.so")):
            return False
    return True


def typical_s(names: Iterable[str]) -> float:
    """How long loading `names` usually takes here: a few seconds when built, else their build times."""
    names = list(names)
    if is_built(names):
        return LOAD_S
    times = _build_times()
    return LOAD_S + sum(times.get(OP_NAMES.get(n, n), DEFAULT_BUILD_S) for n in names)


def _build_times() -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads((extensions_dir() / BUILD_TIMES).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _record_build_time(op: str, seconds: float) -> None:
    times = _build_times() | {op: round(seconds, 1)}
    tmp = extensions_dir() / f"{BUILD_TIMES}.{os.getpid()}"
    tmp.write_text(json.dumps(times))
    os.replace(tmp, extensions_dir() / BUILD_TIMES)


def clear_leftover_batons(*, deadline: float) -> list[Path]:
    """Remove every baton no live process holds (call with the build lock held); wait, until
    `deadline` (time.monotonic), for one a live process holds. Returns the batons removed."""
    removed: list[Path] = []
    started = time.monotonic()
    for baton in sorted(extensions_dir().glob(f"*/{BATON}")):
        while baton.exists():  # bounded: the deadline below
            # its builder, or the compilers a killed builder left running in the folder (let them finish)
            owners = [p for p in {*locks.holders(baton), *locks.working_in(baton.parent)} if p != os.getpid()]
            if not owners:
                try:
                    baton.unlink()
                    removed.append(baton)
                    logger.warning("removed the build lock a killed build left behind: %s", baton)
                except FileNotFoundError:
                    pass  # its builder finished just now
                break
            if time.monotonic() > deadline:
                raise locks.LockTimeoutError(
                    f"DeepSpeed op build: {baton} is held by "
                    f"{', '.join(map(locks.describe, sorted(owners)))} "
                    f"for {time.monotonic() - started:.0f} s (a build outside this project's lock); "
                    f"end that process, or raise {TIMEOUT_ENV}"
                )
            time.sleep(0.5)
    return removed


def load_ops(names: Iterable[str] | None = None) -> dict[str, float]:
    """Build (or load from the cache) the accelerator's ops `names` (default: all of its CPU ops on a
    CPU) into this process, one builder at a time; returns the seconds each took."""
    root = extensions_dir()
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    names = (
        tuple(names)
        if names is not None
        else (CPU_OPS if acc.device_name() == "cpu" else ("CPUAdamBuilder",))
    )
    seconds: dict[str, float] = {}
    if not names:
        return seconds
    deadline = time.monotonic() + _timeout_s()
    with locks.hold(root / BUILD_LOCK, what="DeepSpeed's op build lock", timeout_s=_timeout_s()):
        clear_leftover_batons(deadline=deadline)
        for name in names:
            started = time.monotonic()
            builder = acc.create_op_builder(name)
            if builder is None or not builder.is_compatible(verbose=False):
                logger.warning("DeepSpeed op %s is not available on %s; skipped", name, acc.device_name())
                continue
            was_built = is_built([name])
            builder.load(verbose=False)
            seconds[name] = round(time.monotonic() - started, 1)
            if not was_built:
                _record_build_time(OP_NAMES.get(name, name), seconds[name])
    return seconds


def main() -> int:
    from rlhf_engine.runtime import fencing

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fencing.start_watchdog()  # started by a worker: ends with the worker
    for name, s in load_ops().items():
        print(f"DeepSpeed op {name}: ready ({s} s)")
    print(f"TORCH_EXTENSIONS_DIR={extensions_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
