"""Hold a step folder's writer lock (rlhf_engine/runtime/fencing.py), say "held", and sleep.

`python tests/rlhf_engine/runtime/fencing_holder.py DIR`: a lingering trainer of the folder DIR, for
test_a_new_attempt_waits_for_a_lingering_holder_then_ends_it and
test_the_lock_is_free_once_the_holder_is_gone in tests/rlhf_engine/runtime/test_fencing.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rlhf_engine.runtime import fencing


def main(argv: list[str] | None = None) -> None:
    [folder] = sys.argv[1:] if argv is None else argv
    with fencing.writer(Path(folder)):
        print("held", flush=True)
        time.sleep(120)


if __name__ == "__main__":
    main()
