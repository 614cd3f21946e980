"""A rank of a step (rlhf_engine/runtime/fencing.py): it shares the folder's lock, watches its top process,
and on SIGTERM "checkpoints" for 1.5 s before it exits 0.

`python tests/rlhf_engine/runtime/fencing_rank.py DIR`, with fencing.WATCH_ENV naming the top process;
prints "rank" once it holds its share of DIR's lock. Run by
tests/rlhf_engine/runtime/test_fencing.py::test_ranks_of_a_dead_top_process_stop_and_the_next_holder_waits_for_them.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from types import FrameType

from rlhf_engine.runtime import fencing


def _checkpoint_then_exit(signum: int, frame: FrameType | None) -> None:
    time.sleep(1.5)  # 'checkpoints' for 1.5 s
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    [folder] = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _checkpoint_then_exit)
    fencing.start_watchdog()
    with fencing.rank(Path(folder)):
        print("rank", flush=True)
        time.sleep(120)


if __name__ == "__main__":
    main()
