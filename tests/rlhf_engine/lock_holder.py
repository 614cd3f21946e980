"""Hold a lock of rlhf_engine/locks.py, say "held", and sleep until killed.

`python tests/rlhf_engine/lock_holder.py PATH`: a real process holding the lock at PATH, so the tests in
tests/rlhf_engine/test_locks.py (`_holder`) can check that the lock dies with it and that a waiter names
it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rlhf_engine import locks


def main(argv: list[str] | None = None) -> None:
    [path] = sys.argv[1:] if argv is None else argv
    with locks.hold(Path(path), what="a test lock", timeout_s=5):
        print("held", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    main()
