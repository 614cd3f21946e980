"""Create a file exclusively (O_CREAT | O_EXCL), keep it open, say so, and sleep.

`python tests/helpers/hold_file.py PATH WORD SECONDS`: stands in for a process that holds a lock or
baton file — torch's build baton, or a file rlhf_engine/locks.py looks for holders of. It prints WORD
once the file is created and held, then sleeps SECONDS (the test kills it before that).

Run by tests/rlhf_engine/test_locks.py::test_holders_and_working_in_see_a_live_process,
tests/rlhf_engine/runtime/test_ops.py::test_a_baton_a_live_process_holds_is_waited_for_then_named and
tests/service/test_stall.py::test_a_step_that_stalls_every_time_fails_with_the_reason.
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str] | None = None) -> None:
    path, word, seconds = sys.argv[1:] if argv is None else argv
    fd = os.open(path, os.O_CREAT | os.O_EXCL)  # kept open until the process ends
    print(word, flush=True)
    time.sleep(float(seconds))
    os.close(fd)


if __name__ == "__main__":
    main()
