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
from rlhf_engine.stages.progress import Progress

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"

Level = Literal["info", "warning", "error"]
ROLLOUT_COLUMNS = ("prompt", "answer", "reward", "kl")


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


def tensorboard_dir(config: Any, step_dir: Path) -> Path | None:
    """Where a step writes for TensorBoard: None when off; `tensorboard_path` (inside the run, checked
    by the config) or the step's own `tensorboard/` folder."""
    if not config.enable_tensorboard:
        return None
    return Path(config.output_dir) / config.tensorboard_path if config.tensorboard_path else step_dir / "tensorboard"


class Records:
    """Writer of one step folder's metrics, events, rollouts and summary (a no-op off rank 0), and of
    what people watch: the step's progress (a bar on a terminal, lines in a log) and, when asked,
    TensorBoard (every number of a metrics line as a scalar, evaluations, rollouts as text)."""

    def __init__(self, step_dir: Path, *, enabled: bool, title: str = "", tensorboard: Path | None = None) -> None:
        self.dir = step_dir
        self.enabled = enabled
        self.progress = Progress(title or step_dir.name) if enabled else None
        self.tensorboard = tensorboard if enabled else None
        self._tb: Any = None
        self._purge_step: int | None = None
        if enabled:
            step_dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, obj: dict[str, Any]) -> None:
        if not self.enabled:
            return
        fencing.check()  # a superseded attempt writes nothing
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(_clean(obj)) + "\n")
            f.flush()

    def _writer(self) -> Any:
        if self._tb is None and self.tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops what the interrupted one wrote past its checkpoint (as metrics.jsonl)
            self._tb = SummaryWriter(str(self.tensorboard), purge_step=self._purge_step)
        return self._tb

    def metric(self, **values: Any) -> None:
        self._append(METRICS, {"time": time.time(), **values})
        if self.progress is not None:
            self.progress.update(values)
        if (tb := self._writer()) is not None:
            step = int(values.get("step", 0))
            for key, value in values.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    tb.add_scalar(f"train/{key}", value, step)
            tb.flush()

    def event(self, type_: str, message: str, *, level: Level = "info", **data: Any) -> None:
        self._append(EVENTS, {"time": time.time(), "level": level, "type": type_, "message": message, "data": data})
        if self.progress is not None and "total_steps" in data:
            self.progress.start(int(data["total_steps"]), int(data.get("global_step", 0)))
        if type_ == "eval" and (tb := self._writer()) is not None:
            at = int(data.get("global_step", 0))
            who = str(data.get("model", "")).lower().replace(" ", "_")  # step 3: the actor, or its EMA
            prefix = f"eval/{who}" if who else "eval"
            for key, value in data.items():
                if key != "global_step" and isinstance(value, int | float) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    tb.add_scalar(f"{prefix}/{key}", value, at)
            tb.flush()

    def rollouts(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Sampled experiences of one step: lines of `name`, and a text table in TensorBoard."""
        for row in rows:
            self._append(name, row)
        if rows and (tb := self._writer()) is not None:
            cells = [" | ".join(str(r.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in ROLLOUT_COLUMNS)
                     for r in rows]  # fmt: skip
            table = "\n".join([" | ".join(ROLLOUT_COLUMNS), " | ".join("---" for _ in ROLLOUT_COLUMNS), *cells])
            tb.add_text("rollouts", table, step)
            tb.flush()

    def truncate(self, after_step: int, *, name: str = METRICS) -> None:
        """Drop lines of `name` past `after_step` (a resumed run is about to write them again)."""
        self._purge_step = after_step + 1
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
            if self.tensorboard is not None and self.tensorboard.is_dir():
                for old in self.tensorboard.glob("events.out.tfevents.*"):
                    old.unlink()

    def summary(self, data: dict[str, Any]) -> None:
        if self.enabled:
            fencing.check()
            write_json_atomic(self.dir / SUMMARY, data)
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def is_finished(step_dir: Path) -> bool:
    return (step_dir / SUMMARY).is_file()
