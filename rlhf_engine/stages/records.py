"""The files a step leaves for people and for the worker (docs/contracts.md §1).

- `metrics.jsonl`: one JSON object per optimizer step;
- `events.jsonl`: `{"time", "level", "type", "message", "data"}` — step_started, checkpoint_saved,
  eval, warning, step_finished, error;
- `summary.json`: written last and atomically; its presence marks the step as finished.

Only rank 0 writes. Lines are flushed as written so a watcher (the training worker) sees progress
live, and a resumed run first cuts `metrics.jsonl` back to its checkpoint so no step appears twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from rlhf_engine.runtime import fencing
from rlhf_engine.stages.progress import Progress

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"

Level = Literal["info", "warning", "error"]
ROLLOUT_COLUMNS = ("prompt", "answer", "reward", "kl")
WANDB_ID = ".wandb_id"


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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
    t = config.tracking
    if not t.enable_tensorboard:
        return None
    return Path(config.output_dir) / t.tensorboard_path if t.tensorboard_path else step_dir / "tensorboard"


def wandb_settings(config: Any, step_dir: Path) -> dict[str, Any] | None:
    """`wandb.init` arguments for a step (None when off): one W&B run per step, grouped by the run
    directory. The API key and the mode (online/offline) come from the environment, never from here."""
    t = config.tracking
    if not t.wandb_project:
        return None
    run = Path(config.output_dir).resolve().name
    options = {k: v for k, v in dataclasses.asdict(config).items() if k != "tracking"}
    return {
        "project": t.wandb_project,
        "entity": t.wandb_entity or None,
        "tags": list(t.wandb_tags) or None,
        "name": f"{t.wandb_name or run}-{step_dir.name}",
        "group": t.wandb_name or run,
        "job_type": step_dir.name,
        "config": options,
    }


class Records:
    """Writer of one step folder's metrics, events, rollouts and summary (a no-op off rank 0), and of
    what people watch: the step's progress (a bar on a terminal, lines in a log) and, when asked,
    TensorBoard and Weights & Biases (every number of a metrics line, evaluations, rollouts)."""

    def __init__(
        self,
        step_dir: Path,
        *,
        enabled: bool,
        title: str = "",
        tensorboard: Path | None = None,
        wandb: dict[str, Any] | None = None,
    ) -> None:
        self.dir = step_dir
        self.enabled = enabled
        self.progress = Progress(title or step_dir.name) if enabled else None
        self.tensorboard = tensorboard if enabled else None
        self.wandb = wandb if enabled else None
        self._tb: Any = None
        self._wb: Any = None
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

    def _run(self) -> Any:
        if self._wb is None and self.wandb is not None:
            import wandb

            ids = self.dir / WANDB_ID  # a resumed step goes on logging into the same W&B run
            run_id = ids.read_text().strip() if ids.is_file() else uuid.uuid4().hex[:16]
            ids.write_text(run_id)
            self._wb = wandb.init(**self.wandb, id=run_id, resume="allow", dir=str(self.dir))
        return self._wb

    def _publish(self, scalars: dict[str, float], step: int) -> None:
        if not scalars:
            return
        if (tb := self._writer()) is not None:
            for tag, value in scalars.items():
                tb.add_scalar(tag, value, step)
            tb.flush()
        if (wb := self._run()) is not None:
            wb.log(scalars, step=step)

    def metric(self, **values: Any) -> None:
        self._append(METRICS, {"time": time.time(), **values})
        if self.progress is not None:
            self.progress.update(values)
        self._publish(
            {f"train/{k}": float(v) for k, v in values.items() if k != "step" and _number(v)},
            int(values.get("step", 0)),
        )

    def event(self, type_: str, message: str, *, level: Level = "info", **data: Any) -> None:
        self._append(
            EVENTS, {"time": time.time(), "level": level, "type": type_, "message": message, "data": data}
        )
        if self.progress is not None and "total_steps" in data:
            self.progress.start(int(data["total_steps"]), int(data.get("global_step", 0)))
        if type_ == "eval":
            who = str(data.get("model", "")).lower().replace(" ", "_")  # step 3: the actor, or its EMA
            prefix = f"eval/{who}" if who else "eval"
            self._publish(
                {f"{prefix}/{k}": float(v) for k, v in data.items() if k != "global_step" and _number(v)},
                int(data.get("global_step", 0)),
            )

    def rollouts(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Sampled experiences of one step: lines of `name`, and a table in TensorBoard and W&B."""
        for row in rows:
            self._append(name, row)
        if not rows:
            return
        if (tb := self._writer()) is not None:
            cells = [
                " | ".join(str(r.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in ROLLOUT_COLUMNS)
                for r in rows
            ]
            table = "\n".join(
                [" | ".join(ROLLOUT_COLUMNS), " | ".join("---" for _ in ROLLOUT_COLUMNS), *cells]
            )
            tb.add_text("rollouts", table, step)
            tb.flush()
        if (wb := self._run()) is not None:
            import wandb

            data = [[r.get(k) for k in ROLLOUT_COLUMNS] for r in rows]
            wb.log({"rollouts": wandb.Table(columns=list(ROLLOUT_COLUMNS), data=data)}, step=step)

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
        if self._wb is not None:
            self._wb.finish()
            self._wb = None


def is_finished(step_dir: Path) -> bool:
    return (step_dir / SUMMARY).is_file()
