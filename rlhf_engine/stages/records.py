"""The files a step leaves for people and for the worker (CONTRACTS.md §1).

- `metrics.jsonl`: one JSON object per optimizer step;
- `events.jsonl`: `{"time", "level", "type", "message", "data"}` — step_started, checkpoint_saved,
  eval, warning, step_finished, error;
- `summary.json`: written last and atomically; its presence marks the step as finished.

Only rank 0 writes. Lines are flushed as written so a watcher (the training worker) sees progress
live, and a resumed run first cuts `metrics.jsonl` back to its checkpoint so no step appears twice.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from rlhf_engine.engine import fencing

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"

Level = Literal["info", "warning", "error"]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null (json.dumps would write invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(_clean(data), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is unreliable
    return out


class Records:
    """Writer of one step folder's metrics, events and summary (a no-op off rank 0)."""

    def __init__(self, step_dir: Path, *, enabled: bool) -> None:
        self.dir = step_dir
        self.enabled = enabled
        if enabled:
            step_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, obj: dict[str, Any]) -> None:
        if not self.enabled:
            return
        fencing.check()  # a superseded attempt writes nothing
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(_clean(obj)) + "\n")
            f.flush()

    def metric(self, **values: Any) -> None:
        self._append(METRICS, {"time": time.time(), **values})

    def event(self, type_: str, message: str, *, level: Level = "info", **data: Any) -> None:
        self._append(EVENTS, {"time": time.time(), "level": level, "type": type_, "message": message, "data": data})

    def truncate(self, after_step: int, *, name: str = METRICS) -> None:
        """Drop lines of `name` past `after_step` (a resumed run is about to write them again)."""
        if not self.enabled or not (self.dir / name).is_file():
            return
        fencing.check()
        rows = [r for r in read_jsonl(self.dir / name) if r.get("step", 0) <= after_step]
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, self.dir / name)

    def reset(self) -> None:
        """Start a step afresh: drop the records of an earlier run."""
        if self.enabled:
            fencing.check()
            for name in (METRICS, EVENTS, SUMMARY):
                (self.dir / name).unlink(missing_ok=True)

    def summary(self, data: dict[str, Any]) -> None:
        if self.enabled:
            fencing.check()
            write_json_atomic(self.dir / SUMMARY, data)


def is_finished(step_dir: Path) -> bool:
    return (step_dir / SUMMARY).is_file()
