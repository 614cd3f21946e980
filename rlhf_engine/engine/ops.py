"""DeepSpeed's JIT-compiled ops: build them once per machine, and never hang on a stale build lock.

On CPU DeepSpeed compiles a shared-memory communication op on the first `init_distributed`, and
the CPU Adam op for optimizer offload (DeepSpeedCPUAdam) (~45 s each). We pass torch's AdamW
otherwise, so DeepSpeed's config-built FusedAdam is never needed. torch caches the
result in `TORCH_EXTENSIONS_DIR`; we point that into the rlhf cache so a build is paid once, and
remove the `lock` file a killed build leaves behind (later builds would wait on it forever).

    python -m rlhf_engine.engine.ops        # what `make` runs after installing
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from rlhf_engine.paths import cache_dir

logger = logging.getLogger(__name__)

# The accelerator's builder class names (see deepspeed.accelerator.*_accelerator.get_op_builder).
CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def extensions_dir() -> Path:
    """`TORCH_EXTENSIONS_DIR`, set to `<rlhf cache>/torch_extensions` unless already set."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_dir("torch_extensions"))
    path = Path(os.environ["TORCH_EXTENSIONS_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_stale_locks(max_age_s: float = 600.0) -> list[Path]:
    """Delete build locks older than `max_age_s` (a build takes under a minute; 0 = all)."""
    removed = []
    now = time.time()
    for lock in extensions_dir().rglob("lock"):
        try:
            if now - lock.stat().st_mtime >= max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            pass  # a build that just finished removed it
    for lock in removed:
        logger.warning("removed a stale DeepSpeed build lock: %s", lock)
    return removed


def build_ops(names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Compile (or load from the cache) the accelerator's ops; returns seconds per op."""
    extensions_dir()
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    names = names or (CPU_OPS if acc.device_name() == "cpu" else ())
    seconds = {}
    for name in names:
        started = time.monotonic()
        builder = acc.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            logger.warning("DeepSpeed op %s is not available on %s; skipped", name, acc.device_name())
            continue
        builder.load(verbose=False)
        seconds[name] = round(time.monotonic() - started, 1)
    return seconds


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    clear_stale_locks(max_age_s=0)  # run from make: nothing else is building now
    for name, s in build_ops().items():
        print(f"DeepSpeed op {name}: ready ({s} s)")
    print(f"TORCH_EXTENSIONS_DIR={extensions_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
