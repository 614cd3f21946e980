"""A step's progress for whoever watches it: a live tqdm bar on a terminal, or a plain line every
`every_s` seconds (and at the end) when the output is a log file or a pipe — a worker's step log,
`rlhf train` relaying its steps, CI. Driven by the step's own records (`Records.metric`), so every
step shows the same thing: step/total, loss or reward and KL, samples/s, ETA."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

EVERY_ENV = "RLHF_PROGRESS_EVERY_S"  # how often a piped step prints its progress line (default 10 s)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def describe(values: dict[str, Any]) -> str:
    """The numbers a person watches, from one metrics line: the loss (steps 1-2) or the reward and the
    KL to the reference (step 3), and the throughput."""
    parts = []
    for key, label, fmt in (
        ("loss", "loss", ".4f"),
        ("reward_mean", "reward", ".3f"),
        ("kl_to_ref", "kl", ".3f"),
        ("accuracy", "acc", ".3f"),
        ("samples_per_s", "samples/s", ".1f"),
    ):
        if isinstance(values.get(key), int | float):
            parts.append(f"{label} {values[key]:{fmt}}")
    return "  ".join(parts)


class Progress:
    def __init__(self, title: str, *, stream: TextIO | None = None, every_s: float | None = None) -> None:
        self.title = title
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if every_s is not None else float(os.environ.get(EVERY_ENV, "10"))
        self.total = 0
        self.first = 0  # the step it started (or resumed) at
        self.started = time.monotonic()
        self.printed = -float("inf")
        self.bar: Any = None

    def start(self, total: int, done: int = 0) -> None:
        self.close()
        self.total, self.first, self.started, self.printed = total, done, time.monotonic(), -float("inf")
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=self.title, unit="step", file=self.stream)
        else:
            self._line(f"{self.title}: {total} steps" + (f", resuming at step {done}" if done else ""))

    def update(self, values: dict[str, Any]) -> None:
        step = int(values.get("step", 0))
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(describe(values), refresh=True)
            return
        if not self.tty and (now - self.printed >= self.every_s or step >= self.total):
            self.printed = now
            self._line(self.line(step, values, now))

    def line(self, step: int, values: dict[str, Any], now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self.started
        done = step - self.first
        if self.total and step >= self.total:
            eta = f"took {_duration(elapsed)}"
        else:
            eta = f"ETA {_duration(elapsed / done * (self.total - step))}" if done > 0 and self.total else ""
        share = f" ({step / self.total:.0%})" if self.total else ""
        return "  ".join(
            p for p in (f"{self.title}: step {step}/{self.total}{share}", describe(values), eta) if p
        )

    def note(self, text: str) -> None:
        """A line beside the progress (what the step is doing between training steps)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self._line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
