"""A step process under the orphan watchdog (rlhf_engine/runtime/fencing.py), whose starter
(fencing.WATCH_ENV) dies or is already gone.

`python tests/rlhf_engine/runtime/fencing_orphan.py stuck`: ignores SIGTERM (a step stuck between
boundaries), starts the watchdog, prints "up" and sleeps — run by
test_an_orphan_that_ignores_sigterm_leaves_after_its_grace.
`python tests/rlhf_engine/runtime/fencing_orphan.py step`: starts the watchdog, then prints "trained" —
run by test_a_step_whose_starter_is_already_gone_does_not_start. Both tests are in
tests/rlhf_engine/runtime/test_fencing.py.
"""

from __future__ import annotations

import signal
import sys
import time

from rlhf_engine.runtime import fencing


def main(argv: list[str] | None = None) -> None:
    [mode] = sys.argv[1:] if argv is None else argv
    if mode == "stuck":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a step stuck between boundaries
        fencing.start_watchdog()
        print("up", flush=True)
        time.sleep(120)
    elif mode == "step":
        fencing.start_watchdog()
        print("trained")
    else:
        raise SystemExit(f"unknown mode {mode!r}: stuck or step")


if __name__ == "__main__":
    main()
