"""What a step is doing now, for whoever watches it: the training worker (which ends a step that stops
making progress), `rlhf train` and a worker's step log (progress lines), a person reading the folder.

- `STEP_DIR/phase.json`, rewritten atomically at each change and every `BEAT_S` by a thread:
  `{"phase", "label", "since", "progress_at", "beat", "typical_s", "global_step", "total_steps",
  "pid", "attempt", "process_started"}` (times are Unix seconds). `progress_at` moves when the phase
  changes, a training step ends or a long phase reports headway (`tick`: rows tokenised, batches
  evaluated); `beat` moves as long as the process lives. A phase that stops moving is a stalled step.
- `STEP_DIR/phases.jsonl`: one line per phase ended — `{"attempt", "pid", "phase", "label",
  "started", "seconds", "global_step"}`, a run of training steps as one line with its `steps` and its
  `longest_s` — the step's history (and what the chaos drill reads).

Only the process that writes the step's records writes these (rank 0); a superseded attempt writes
nothing (fencing). Stdlib only: the worker reads the file without torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

from rlhf_engine.runtime import fencing

PHASE_FILE = "phase.json"
HISTORY_FILE = "phases.jsonl"
BEAT_S = 2.0  # how often a live step rewrites its beat
TICK_S = 1.0  # `tick` writes at most this often (a progress mark between the beats)

Phase = Literal[
    "starting",
    "building_ops",
    "tokenizing",
    "loading_model",
    "restoring_checkpoint",
    "evaluating",
    "training",
    "saving_checkpoint",
    "saving_model",
]
LABELS: dict[str, str] = {
    "starting": "starting the step",
    "building_ops": "building DeepSpeed ops",
    "tokenizing": "tokenising data",
    "loading_model": "loading models",
    "restoring_checkpoint": "restoring the checkpoint",
    "evaluating": "evaluating",
    "training": "training",
    "saving_checkpoint": "saving a checkpoint",
    "saving_model": "saving the model",
}
STARTING_S = 20.0  # the interpreter, torch and DeepSpeed imported, before the step's first report
ESTIMATE_ENV = (
    "RLHF_STEP_ESTIMATE_S"  # the service's estimate of the whole step, in seconds (a worker sets it)
)


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    m, s = divmod(seconds, 60)
    return f"{m} min {s} s" if m else f"{s} s"


def describe(state: dict[str, Any], *, now: float | None = None) -> str:
    """'building DeepSpeed ops: 38 s, usually 45 s' — a phase as a person reads it."""
    elapsed = (now or time.time()) - float(state.get("since", 0.0))
    typical = state.get("typical_s")
    usual = f", usually {duration(typical)}" if isinstance(typical, int | float) and typical > 0 else ""
    return f"{state.get('label', state.get('phase', '?'))}: {duration(elapsed)}{usual}"


def read(step_dir: Path) -> dict[str, Any] | None:
    """The step's current phase report, or None (no report yet, or one cut by a kill)."""
    try:
        data = json.loads((step_dir / PHASE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "phase" in data else None


def history(step_dir: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in (step_dir / HISTORY_FILE).read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


class Phases:
    """The writer of one step folder's phase report (a no-op when not `enabled`)."""

    def __init__(
        self,
        step_dir: Path,
        *,
        enabled: bool,
        title: str = "",
        stream: TextIO | None = None,
        every_s: float | None = None,
    ) -> None:
        from rlhf_engine.stages.progress import EVERY_ENV

        self.dir, self.enabled, self.title = step_dir, enabled, title or step_dir.name
        self.stream = stream or sys.stderr
        self.every_s = every_s if every_s is not None else float(os.environ.get(EVERY_ENV, "10"))
        self.progress: Any = None  # the step's Progress, once it exists: lines go through its bar
        self.attempt = os.environ.get(fencing.ATTEMPT_ENV)
        self.started = time.time()
        self.state: dict[str, Any] = {}
        self.step_times: deque[float] = deque(maxlen=20)  # the recent training steps' durations
        self.durations: dict[str, float] = {}  # the last duration of each phase in this process
        self._training_run: dict[str, Any] | None = None
        self._said = 0.0
        self._written = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            step_dir.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._beat, name="rlhf-phase-beat", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ what the loop calls

    def enter(
        self,
        phase: Phase,
        *,
        typical_s: float | None = None,
        global_step: int | None = None,
        total_steps: int | None = None,
        label: str | None = None,
    ) -> None:
        """A new phase begins now (the one before it ends)."""
        if not self.enabled:
            return
        now = time.time()
        with self._lock:
            self._end(now, phase)
            if typical_s is None and phase in self.durations and phase != "training":
                typical_s = self.durations[phase]  # the same phase earlier in this step
            self.state = {
                "phase": phase,
                "label": label or LABELS[phase],
                "since": now,
                "progress_at": now,
                "typical_s": round(typical_s, 3) if typical_s else None,
                "global_step": global_step,
                "total_steps": total_steps,
            }
            self._write(now)
        if phase != "training":  # (a training step's progress is the step's own progress line)
            self._say(self._line(now), now)

    def training(self, global_step: int, total_steps: int, *, estimate_s: float | None = None) -> None:
        """Optimizer step `global_step + 1` of `total_steps` begins (the previous one, if any, ended)."""
        if not self.enabled:
            return
        now = time.time()
        if self.state.get("phase") == "training":
            self.step_times.append(now - float(self.state["since"]))
        typical = statistics.median(self.step_times) if self.step_times else estimate_s
        self.enter(
            "training",
            typical_s=typical,
            global_step=global_step,
            total_steps=total_steps,
            label=f"training step {global_step + 1} of {total_steps}",
        )

    def tick(self) -> None:
        """Headway inside a long phase (rows tokenised, a batch evaluated): progress, written at most
        every TICK_S."""
        if not self.enabled or not self.state:
            return
        now = time.time()
        with self._lock:
            self.state["progress_at"] = now
            if now - self._written >= TICK_S:
                self._write(now)

    def close(self) -> None:
        """The step's work ended (finished, stopped, or failed): the last phase is recorded."""
        if not self.enabled:
            return
        self._stop.set()
        with self._lock:
            self._end(time.time())
            self.state = {}
        self.enabled = False

    # ------------------------------------------------------------------ the files

    def _end(self, now: float, next_phase: str | None = None) -> None:
        """Record the phase that ends (call with the lock held). A run of training steps is one line
        (its first step, its step count and its longest step), written when another phase begins."""
        if not self.state:
            return
        seconds = now - float(self.state["since"])
        self.durations[self.state["phase"]] = seconds
        if self.state["phase"] == "training":
            run = self._training_run or {
                "started": self.state["since"],
                "global_step": self.state["global_step"] or 0,
                "steps": 0,
                "longest_s": 0.0,
            }
            run["steps"] += 1
            run["longest_s"] = max(run["longest_s"], seconds)
            self._training_run = run
            if next_phase == "training":
                return
            line = {
                "phase": "training",
                "label": f"training steps {run['global_step'] + 1}-{run['global_step'] + run['steps']}",
                "started": run["started"],
                "seconds": now - run["started"],
                "global_step": run["global_step"],
                "steps": run["steps"],
                "longest_s": round(run["longest_s"], 3),
            }
            self._training_run = None
        else:
            line = {
                "phase": self.state["phase"],
                "label": self.state["label"],
                "started": self.state["since"],
                "seconds": seconds,
                "global_step": self.state["global_step"],
            }
        if fencing.superseded():
            return
        line = {"attempt": self.attempt, "pid": os.getpid(), **line, "seconds": round(line["seconds"], 3)}
        with open(self.dir / HISTORY_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")

    def _write(self, now: float) -> None:
        """Rewrite phase.json (call with the lock held); a superseded attempt writes nothing."""
        if not self.state or fencing.superseded():
            return
        data = {
            **self.state,
            "beat": now,
            "pid": os.getpid(),
            "attempt": self.attempt,
            "process_started": self.started,
        }
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{PHASE_FILE}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.dir / PHASE_FILE)
        self._written = now

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            now = time.time()
            with self._lock:
                self._write(now)
                state = dict(self.state)
            if state and state["phase"] != "training" and now - self._said >= self.every_s:
                self._say(self._line(now, state, still=True), now)

    # ------------------------------------------------------------------ what people read

    def _line(self, now: float, state: dict[str, Any] | None = None, *, still: bool = False) -> str:
        return f"{self.title}: {'still ' if still else ''}{describe(state or self.state, now=now)}"

    def _say(self, text: str, now: float) -> None:
        self._said = now
        if self.progress is not None:
            self.progress.note(text)
        else:
            print(text, file=self.stream, flush=True)


_current: Phases | None = None


def start(step_dir: Path, *, enabled: bool, title: str = "") -> Phases:
    """The process's phase reporter for `step_dir` (what `tick` reaches from deep inside a phase)."""
    global _current
    if _current is not None:
        _current.close()
    _current = Phases(step_dir, enabled=enabled, title=title)
    return _current


def tick() -> None:
    """Headway in the current phase, from anywhere (tokenising, evaluating); a no-op without a reporter."""
    if _current is not None:
        _current.tick()


@contextlib.contextmanager
def running(step_dir: Path, *, enabled: bool, title: str = "") -> Iterator[Phases]:
    phases = start(step_dir, enabled=enabled, title=title)
    try:
        yield phases
    finally:
        phases.close()
