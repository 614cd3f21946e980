"""The clock the rate limits count by (service/limits.py): seconds since the epoch, `time.time` unless
a caller passes another. A test passes a `ManualClock` and moves it with `advance`, so a window's end
takes no waiting.

Only in-process: a server started as a subprocess reads the real clock; its tests set a window that
does not end during the test instead (`rate_window_s`, service/settings.py).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Seconds since the epoch, as `time.time()` gives them."""

    def __call__(self) -> float: ...


system_clock: Clock = time.time


class ManualClock:
    """A clock that moves only when told (tests): starts at `start`, moves by `advance(seconds)`."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
