"""Load the shared-memory DeepSpeed op in a fresh process (rlhf_engine/runtime/ops.py) and print it.

`python tests/rlhf_engine/runtime/ops_loader.py`, with TORCH_EXTENSIONS_DIR set: DeepSpeed keeps loaded
ops per process, so each case of tests/rlhf_engine/runtime/test_ops.py (`_load`) runs this anew.
"""

from __future__ import annotations

from rlhf_engine.runtime import ops


def main() -> None:
    print(ops.load_ops(("ShareMemCommBuilder",)))


if __name__ == "__main__":
    main()
