"""What the training worker sees of a running step: its phase, how long that phase may go without
progress, and whether it has stalled.

The step reports its phase in `STEP_DIR/phase.json` (rlhf_engine/stages/phase.py): the phase, since
when, its last progress, how long it usually takes. A phase may go without progress for
`max(stall_floor_s, stall_factor × usual time)` (only the floor when nothing says what is usual);
past that the step is stalled — hung on a lock, a dead peer, a frozen disk — and the worker ends it
and retries it like a killed step. Until the step's first report the phase is "starting".

Clocks: the step's times are Unix seconds (another process wrote them); `now` is passed in, so the
rules are tested without waiting.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from rlhf_engine.stages import phase as phases


@dataclasses.dataclass(frozen=True)
class Seen:
    """A step's phase as the worker last read it."""

    name: str
    label: str
    since: float
    progress_at: float
    typical_s: float | None
    bound_s: float
    beat: float | None

    def public(self, step: int | None) -> dict[str, Any]:
        """What the job record keeps (and the API shows, with the elapsed time added)."""
        return {
            "name": self.name,
            "label": self.label,
            "step": step,
            "since": round(self.since, 3),
            "typical_s": self.typical_s,
            "bound_s": round(self.bound_s, 1),
        }


def bound_s(typical_s: float | None, *, floor_s: float, factor: float) -> float:
    """How long a phase may go without progress: `factor` × its usual time, never under the floor."""
    return max(floor_s, factor * typical_s) if typical_s else floor_s


class PhaseWatch:
    """Reads one attempt's phase reports; `started` is when the worker started the step (Unix time):
    a report older than that is an earlier attempt's."""

    def __init__(self, step_dir: Path, *, started: float, floor_s: float, factor: float) -> None:
        self.dir, self.started, self.floor_s, self.factor = step_dir, started, floor_s, factor
        # when a cluster scheduler started running it (its queue time is no part of "starting")
        self.running_since: float | None = None

    def read(self) -> Seen:
        report = phases.read(self.dir)
        if report is None or float(report.get("process_started", 0.0)) < self.started - 1.0:
            typical: float | None = phases.STARTING_S
            since = self.running_since or self.started
            return Seen(
                "starting",
                phases.LABELS["starting"],
                since,
                since,
                typical,
                bound_s(typical, floor_s=self.floor_s, factor=self.factor),
                None,
            )
        typical = report.get("typical_s")
        typical = float(typical) if isinstance(typical, int | float) and typical > 0 else None
        return Seen(
            name=str(report["phase"]),
            label=str(report.get("label") or report["phase"]),
            since=float(report.get("since", self.started)),
            progress_at=float(report.get("progress_at", report.get("since", self.started))),
            typical_s=typical,
            bound_s=bound_s(typical, floor_s=self.floor_s, factor=self.factor),
            beat=float(report["beat"]) if isinstance(report.get("beat"), int | float) else None,
        )

    @staticmethod
    def stalled(seen: Seen, now: float | None = None) -> str | None:
        """Why the step counts as stalled (None while it makes progress): 'stalled while <phase> for N s'."""
        now = time.time() if now is None else now
        idle = now - seen.progress_at
        if idle <= seen.bound_s:
            return None
        if seen.beat is None:
            alive = "; the step never reported"
        elif now - seen.beat > 3 * phases.BEAT_S + 5:
            alive = f"; no sign of life for {now - seen.beat:.0f} s"
        else:
            alive = "; the process is alive but makes no progress"
        return f"stalled while {seen.label} for {idle:.0f} s (bound {seen.bound_s:.0f} s{alive})"
