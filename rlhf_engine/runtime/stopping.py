"""Stopping a training step cleanly between optimizer steps: checkpoint, record, exit.

Two ways to ask: the file `STEP_DIR/STOP` (what the training worker writes to pause a job, and what
works through any launcher and across nodes), or SIGTERM to the step's process (each rank of a
launched run gets it from the launcher). Every rank checks at the same step boundary and they agree
(all-reduce), so all of them save the same checkpoint and leave together. The run exits with
`EXIT_STOPPED`; rerunning the same command resumes from that checkpoint. Whoever asks removes the
file before starting the step again.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from rlhf_engine.runtime.distributed import Dist

STOP_FILE = "STOP"
EXIT_STOPPED = 75  # EX_TEMPFAIL: not finished, not failed; run again to continue


class StepStoppedError(Exception):
    def __init__(self, global_step: int, checkpoint: Path | None) -> None:
        super().__init__(
            f"stopped at step {global_step}" + (f" (checkpoint {checkpoint})" if checkpoint else "")
        )
        self.global_step = global_step
        self.checkpoint = checkpoint


class StopRequest:
    def __init__(self, step_dir: Path, dist: Dist) -> None:
        self.path = step_dir / STOP_FILE
        self.dist = dist
        self._signalled = False
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signalled = True

    def requested(self) -> bool:
        """True on every rank if any rank was asked to stop (a collective call: every rank makes it)."""
        local = self._signalled or self.path.exists()
        if self.dist.world_size == 1:
            return local
        import torch
        import torch.distributed as tdist

        flag = torch.tensor([1.0 if local else 0.0], device=self.dist.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        return bool(flag.item())
