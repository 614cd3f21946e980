"""The training task: one job, its steps as child processes, its progress into the database.

    rlhf.train_job(job_id)
      claim the job's lease (a second delivery of the same job sees the lease, acknowledges, exits)
      for each step not finished yet: write its options, run `rlhf sft|reward|ppo --config F` (under
        the DeepSpeed launcher when num_gpus > 1) in its own process group, and while it runs:
          - copy new lines of its metrics.jsonl / events.jsonl into the database (idempotently)
          - every heartbeat: renew the lease, progress, estimated finish
          - every cost interval: one CostInterval row (unique per job/step/attempt/interval)
          - cancel → kill the step; pause, budget reached or worker shutdown → STOP file: the step
            checkpoints and exits, the job becomes paused (or queued again, for a shutdown)
      the step succeeded iff its summary.json exists (the completion marker)

Heavy imports stay out: the steps import torch in their own processes; this module does not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf_engine.config.pipeline import Step
from service.db.models import CostInterval, Job, JobCheckpoint, JobMetric, utcnow
from service.db.session import session_scope
from service.jobs import lifecycle, results
from service.jobs.lifecycle import JUDGE_TOKEN, LeaseLostError, add_event
from service.jobs.plan import step_table
from service.jobs.states import StepOutcome, StopReason
from service.services import cost as costs
from service.services import files as files_svc
from service.services import models as models_svc
from service.services.ids import job_model_id
from service.settings import Settings
from workers import launchers
from workers.bundled import build_bundled
from workers.watch import PhaseWatch, Seen

logger = logging.getLogger(__name__)
PREPARE_REPORT_S = 15.0  # how often a job that builds its base model says how far it got
SHUTDOWN = threading.Event()  # set when the worker is asked to stop (SIGTERM → Celery's warm shutdown)
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass
class Outcome:
    kind: StepOutcome
    message: str = ""
    resumable: bool = False  # killed by a time limit or a preemption (step_runs.Ended.resumable)


def renew(s: Session, job_id: str, settings: Settings, owner: str, **values: Any) -> Job:
    return lifecycle.renew(session=s, job_id=job_id, owner=owner, settings=settings, **values)


# ---------------------------------------------------------------------------- records → database


class Ingest:
    """Reads a step's metrics.jsonl / events.jsonl from where it left off; rows are keyed so a re-read
    (after a worker restart) inserts nothing twice.

    A resumed step rewrites metrics.jsonl (cut back to its checkpoint, into a new file: os.replace) and
    appends the steps past it again; a step started afresh deletes both files. A file is followed by
    identity, not by size alone — its inode, and the last line read still ending where reading stopped
    (a new file may reuse a deleted one's inode, and can outgrow the old offset before the next read:
    reading on from there would skip the steps written again). A file found rewritten is read from its
    start: its steps' rows take the new lines' values, and rows past its last step (the killed
    attempt's, not written again yet) are dropped, so the rows always mirror the file."""

    FILES = ("metrics.jsonl", "events.jsonl")

    def __init__(self, job_id: str, step: int, step_dir: Path, settings: Settings | None = None) -> None:
        self.job_id, self.step, self.dir, self.settings = job_id, step, step_dir, settings
        self.eval_runs: list[str] = []  # the job's evals queued on new checkpoints, to enqueue once committed
        self.offsets = dict.fromkeys(self.FILES, 0)
        self.inodes: dict[str, int | None] = dict.fromkeys(self.FILES)
        self.tails = dict.fromkeys(self.FILES, b"")  # the last whole line read, which ends at the offset
        self.last_metric: dict[str, Any] = {}
        self.total_steps = 0

    def _lines(self, name: str) -> tuple[list[dict[str, Any]], bool]:
        """The whole lines added since the last read, and whether the file was found rewritten (read
        from its start again, or deleted) after something had been read from it."""
        offset, tail = self.offsets[name], self.tails[name]
        try:
            f = open(self.dir / name, "rb")  # noqa: SIM115 - closed below; fstat needs the open file
        except FileNotFoundError:  # deleted (the step starts afresh): what appears next is a new file
            self.inodes[name], self.offsets[name], self.tails[name] = None, 0, b""
            return [], offset > 0
        with f:
            st = os.fstat(f.fileno())  # the file opened, not whatever the path names a moment later
            same = st.st_ino == self.inodes[name] and st.st_size >= offset
            if same and tail:
                f.seek(offset - len(tail))
                same = f.read(len(tail)) == tail
            if not same:
                self.inodes[name], self.offsets[name], self.tails[name] = st.st_ino, 0, b""
            f.seek(self.offsets[name])
            data = f.read()
        end = data.rfind(b"\n") + 1  # only whole lines; a partial last line is read next time
        if end:
            self.offsets[name] += end
            self.tails[name] = data[data.rfind(b"\n", 0, end - 1) + 1 : end]
        out = []
        for line in data[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out, not same and offset > 0

    def _metric_row(self, session: Session, global_step: int) -> JobMetric | None:
        return session.scalar(
            select(JobMetric).where(
                JobMetric.job_id == self.job_id,
                JobMetric.step == self.step,
                JobMetric.global_step == global_step,
            )
        )

    def run(self, session: Session) -> None:
        lines, rewritten = self._lines("metrics.jsonl")
        events = self._lines("events.jsonl")[0]
        for e in events:  # the step's length first: the metrics events of the same read say "n of N"
            if "total_steps" in (e.get("data") or {}):
                self.total_steps = int(e["data"]["total_steps"])
        if rewritten:  # read from the start: drop the rows the file no longer holds
            newest = max((int(m.get("step", 0)) for m in lines), default=0)
            session.execute(
                delete(JobMetric).where(
                    JobMetric.job_id == self.job_id,
                    JobMetric.step == self.step,
                    JobMetric.global_step > newest,
                )
            )
        for m in lines:
            gs = int(m.get("step", 0))
            self.last_metric = m
            row = self._metric_row(session, gs)
            if row is None:
                session.add(
                    JobMetric(
                        job_id=self.job_id,
                        step=self.step,
                        global_step=gs,
                        time=float(m.get("time", 0.0)),
                        values=m,
                    )
                )
            elif (merged := {**row.values, **m}) != row.values:
                # written again by a resumed attempt; what the worker added (peak memory) stays
                row.time, row.values = float(m.get("time", 0.0)), merged
                m = merged
            self._metrics_event(session, gs, m)
        for e in events:  # a log: a rewritten file's lines are added to it
            data = e.get("data") or {}
            add_event(
                session=session,
                job=self.job_id,
                type_=str(e.get("type", "message")),
                message=str(e.get("message", "")),
                level=str(e.get("level", "info")),
                step=self.step,
                data=data,
                source_key=f"{self.step}:{e.get('time')}:{e.get('type')}",
            )
            if e.get("type") == "checkpoint_saved" and "global_step" in data:
                gs = int(data["global_step"])
                if (
                    session.scalar(
                        select(JobCheckpoint.id).where(
                            JobCheckpoint.job_id == self.job_id,
                            JobCheckpoint.step == self.step,
                            JobCheckpoint.global_step == gs,
                        )
                    )
                    is None
                ):
                    row = self._metric_row(session, gs)  # the checkpoint's own step, not the newest read
                    values = row.values if row is not None else self.last_metric
                    metric = {k: v for k, v in values.items() if isinstance(v, int | float)}
                    ckpt = JobCheckpoint(
                        job_id=self.job_id,
                        step=self.step,
                        global_step=gs,
                        # the checkpoint's chat model where the step wrote one, else its state
                        path=str(data.get("model_path") or data.get("path", "")),
                        metrics=metric,
                    )
                    session.add(ckpt)
                    if data.get("model_path"):
                        self._checkpoint_evals(session, ckpt)
        session.flush()

    def _checkpoint_evals(self, session: Session, ckpt: JobCheckpoint) -> None:
        """The job's `evals: [{every: checkpoint}]` on a new checkpoint of its last step (a chat model)."""
        from service.services import checkpoints
        from service.services import evals as evals_svc

        job = session.get(Job, self.job_id)
        if self.settings is None or job is None or self.step != job.steps[-1] or not job.request.get("evals"):
            return
        session.flush()
        model = checkpoints.model_id(job, ckpt)
        self.eval_runs += evals_svc.job_runs(
            session=session,
            job=job,
            model=model,
            every=("checkpoint",),
            label=f"{model.rsplit(':', 1)[-1]}",
            settings=self.settings,
        )

    def enqueue_evals(self) -> None:
        """Send the eval runs queued by the last (committed) `run` to the evals workers."""
        from service.queue import enqueue_eval

        runs, self.eval_runs = self.eval_runs, []
        for run_id in runs:
            assert self.settings is not None
            enqueue_eval(run_id, self.settings)

    def _metrics_event(self, session: Session, gs: int, values: dict[str, Any]) -> None:
        """OpenAI's `metrics` event of one logged step (its data under the SDK's names); a point written
        again by a resumed attempt updates its event."""
        data = results.sdk_metrics(values, global_step=gs) | {"rlhf_step": self.step}
        if self.total_steps:
            data["total_steps"] = self.total_steps
        add_event(
            session=session,
            job=self.job_id,
            type_="metrics",
            message=results.event_message(data, self.total_steps or None),
            step=self.step,
            data=data,
            source_key=f"metrics:{self.step}:{gs}",
            replace=True,
        )

    @property
    def global_step(self) -> int:
        return int(self.last_metric.get("step", 0))


# ---------------------------------------------------------------------------- one step


def _ensure_model(path: Path, job_id: str, settings: Settings, owner: str) -> None:
    """Bundled tiny models are written into the model root on first use (building one needs torch: a
    child process; the first build pretrains it for a minute or two, so the lease is renewed meanwhile)."""
    if (path / "config.json").is_file():
        return
    if not models_svc.is_bundled(path.name):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    started_at = time.time()
    label, bound = f"preparing base model {path.name}", settings.model_build_timeout_s
    phase = Seen("preparing_model", label, started_at, started_at, None, bound, None).public(step=None)
    with session_scope(settings.db_url) as s:
        job = renew(s, job_id, settings, owner, phase=phase)
        add_event(
            session=s,
            job=job,
            type_="preparing_model",
            message=f"preparing base model {path.name} (first use "
            "on this server: built into the model root, then cached)",
        )
    started = time.monotonic()
    last_report = [started]

    def tick(done: float | None = None) -> None:
        now = time.monotonic()
        if now - last_report[0] < PREPARE_REPORT_S:
            _renew_quietly(settings, job_id, owner)
            return
        last_report[0] = now
        share = f"{done:.0%} done, " if done is not None else ""
        with session_scope(settings.db_url) as s:
            job = renew(s, job_id, settings, owner, phase=phase)
            add_event(
                session=s,
                job=job,
                type_="preparing_model",
                message=f"preparing base model {path.name}: {share}{now - started:.0f} s so far",
                data={"model": path.name, "progress": done},
            )

    build_bundled(path, every_s=settings.heartbeat_s, tick=tick, timeout_s=settings.model_build_timeout_s)
    with session_scope(settings.db_url) as s:
        job = renew(s, job_id, settings, owner)
        add_event(
            session=s,
            job=job,
            type_="model_ready",
            message=f"base model {path.name} ready after {time.monotonic() - started:.0f} s",
            data={"model": path.name},
        )


def _renew_quietly(settings: Settings, job_id: str, owner: str) -> None:
    with session_scope(settings.db_url) as s:
        renew(s, job_id, settings, owner)


def prebuild_ops(settings: Settings) -> None:
    """Build the DeepSpeed ops this machine's steps load, before the worker takes a job (a child process:
    torch stays out of the worker). Nothing to do when the cache has them; a failure is logged, and the
    steps then build them themselves (under the same lock, each bounded)."""
    from rlhf_engine.runtime import ops
    from rlhf_engine.runtime.fencing import WATCH_ENV

    names = ops.default_names()
    if ops.is_built(names):
        return
    logger.info(
        "building DeepSpeed's ops %s into %s before taking jobs (usually %.0f s)",
        ", ".join(names),
        ops.extensions_dir(),
        ops.typical_s(names),
    )
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "rlhf_engine.runtime.ops"],
            capture_output=True,
            text=True,
            timeout=float(os.environ.get(ops.TIMEOUT_ENV, "1800")) + 600,
            env={**os.environ, WATCH_ENV: str(os.getpid())},
        )
    except subprocess.TimeoutExpired:
        logger.error("building DeepSpeed's ops did not finish in time; steps will build them themselves")
        return
    if done.returncode != 0:
        logger.error(
            "building DeepSpeed's ops failed (%s); steps will try again: %s",
            done.returncode,
            (done.stderr or done.stdout)[-800:],
        )
        return
    for line in (
        done.stderr + done.stdout
    ).splitlines():  # what it did: a dead builder's lock removed, each op
        logger.info("ops: %s", line)
    logger.info("DeepSpeed's ops ready after %.0f s", time.monotonic() - started)


def _step_of(method: str, step: int) -> Step:
    """Which command a step of a job runs, and where (a dpo job's step 2 is `rlhf dpo`)."""
    return step_table(method)[step]


def _step_command(job: Job, step: int, out: Path) -> tuple[list[str], Path]:
    cfg_dir, log_dir = out / "configs", out / "logs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    st = _step_of(job.method, step)
    cfg = cfg_dir / f"{st.dir}.yaml"
    cfg.write_text(yaml.safe_dump(job.plan[str(step)], sort_keys=True))
    cmd = [sys.executable, "-m", "rlhf_engine.cli", st.command, "--config", str(cfg)]
    return cmd, log_dir / f"{st.dir}.log"


def run_job_step(job_id: str, step: int, settings: Settings, owner: str) -> Outcome:
    from rlhf_engine import judging
    from rlhf_engine.runtime import fencing
    from rlhf_engine.runtime.launch import LAUNCH_VARS
    from rlhf_engine.runtime.stopping import STOP_FILE
    from rlhf_engine.stages import phase

    with session_scope(settings.db_url) as s:
        job = lifecycle.set_step(
            session=s, job_id=job_id, owner=owner, settings=settings, step=step, status="running"
        )
        out = Path(job.output_dir)
        st = _step_of(job.method, step)
        command, step_dir = st.command, out / st.dir
        cmd, log = _step_command(job, step, out)
        attempt, num_gpus, gpu_type, max_cost = job.attempts, job.num_gpus, job.gpu_type, job.max_cost_usd
        nodes = job.nodes
        estimate_s = ((job.request or {}).get("_seconds") or {}).get(str(step))
        judge_token = (job.request or {}).get(JUDGE_TOKEN)
        add_event(
            session=s,
            job=job,
            type_="step_queued",
            step=step,
            message=f"step {step}: starting `rlhf {command}` (attempt {attempt})",
        )
    # the folder's fencing token: a step of an earlier attempt still running (its worker died) stops
    # without writing, and the new step waits for its lock (rlhf_engine/runtime/fencing.py)
    fencing.write_fence(step_dir, attempt)
    (step_dir / STOP_FILE).unlink(missing_ok=True)
    (step_dir / phase.PHASE_FILE).unlink(missing_ok=True)  # an earlier attempt's report
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env |= {
        fencing.ATTEMPT_ENV: str(attempt),
        fencing.GRACE_ENV: str(settings.step_grace_s),
        phase.ESTIMATE_ENV: str(estimate_s or ""),
        "PYTHONUNBUFFERED": "1",
    }
    if judge_token:  # its model graders ask their judges through the API (service/api/internal.py)
        env[judging.JUDGE_URL_ENV] = f"{settings.internal_url}/internal/v1/jobs/{job_id}/judge"
        env[judging.EMBED_URL_ENV] = f"{settings.internal_url}/internal/v1/jobs/{job_id}/embed"
        env[judging.JUDGE_TOKEN_ENV] = judge_token
    ingest = Ingest(job_id, step, step_dir, settings)
    started = time.monotonic()
    watch = PhaseWatch(
        step_dir, started=time.time(), floor_s=settings.stall_floor_s, factor=settings.stall_factor
    )
    if settings.launch_backend == "local":  # the step stops when this worker ends (fencing's watchdog)
        env[fencing.WATCH_ENV] = str(os.getpid())
    else:  # on another machine it cannot watch this one: a new attempt's fence and scancel end it
        env.pop(fencing.WATCH_ENV, None)
    spec = launchers.StepSpec(
        job_id=job_id,
        step=step,
        attempt=attempt,
        argv=cmd,
        env=env,
        log=log,
        step_dir=step_dir,
        nodes=nodes,
        per_node=max(num_gpus // nodes, 1),
        gpus=gpu_type != "cpu",
        estimate_s=estimate_s,
    )
    try:
        with _renewing(settings, job_id, owner):  # cancelling an earlier attempt's run may take a while
            run = launchers.start(spec, settings)
    except launchers.SupersededLaunchError:  # a newer attempt owns the folder: this worker lost the job
        return Outcome("lost")
    except launchers.LaunchError as e:  # the scheduler refused it: the step fails with its message
        return Outcome("failed", f"step {step} ({command}) could not be submitted: {e}")
    if settings.launch_backend != "local":
        with session_scope(settings.db_url) as s:
            add_event(
                session=s,
                job=job_id,
                type_="step_submitted",
                step=step,
                message=f"step {step}: submitted as {run.label} ({nodes} node(s) × {spec.per_node})",
                data={"backend": settings.launch_backend, "run": run.label},
            )
    interval_started, interval_idx = time.monotonic(), _next_interval(settings, job_id, step, attempt)
    last_beat = 0.0
    stopping: StopReason | None = None
    stop_deadline = 0.0
    was_running = False
    try:
        while True:  # bounded: the step ends, or stalls (ended below), or the job is cancelled or lost
            ingest.enqueue_evals()  # what the last pass queued (committed by now)
            ended = run.poll()
            now = time.monotonic()
            running = ended is not None or run.running()
            left_running = was_running and not running  # requeued by the scheduler (a node lost)
            if running and not was_running:  # out of the scheduler's queue: its clocks start now
                interval_started = now
                watch.running_since = time.time()
            seen = watch.read() if running else _queued(run, watch)
            stalled = watch.stalled(seen) if running and ended is None and stopping is None else None
            with session_scope(settings.db_url) as s:
                ingest.run(s)
                if left_running or (
                    running
                    and (now - interval_started >= settings.cost_interval_s or ended is not None or stalled)
                ):
                    # a stalled attempt is billed up to the moment the stall is seen, not while it is ended;
                    # a step waiting in the scheduler's queue holds no machine and is not billed
                    _accrue(
                        s, job_id, step, attempt, interval_idx, now - interval_started, num_gpus, gpu_type
                    )
                    interval_idx += 1
                    interval_started = now
                was_running = running
                if ended is not None:
                    break
                live = s.get(Job, job_id, populate_existing=True)
                assert live is not None
                job = live
                if job.status == "cancelled" or job.control == "cancel":
                    _stop(run, 10, s, settings, job_id, owner)
                    return Outcome("cancelled")
                if stalled:
                    _stop(run, 0, s, settings, job_id, owner)  # it cannot checkpoint: it is stuck
                    message = (
                        f"step {step} ({command}) {stalled}; the attempt was ended and its cost stopped then"
                    )
                    add_event(
                        session=s,
                        job=job,
                        type_="step_stalled",
                        level="warn",
                        step=step,
                        message=message,
                        data={"phase": seen.public(step)},
                    )
                    return Outcome("stalled", message)
                if now - last_beat >= settings.heartbeat_s:
                    total = max(ingest.total_steps, 1)
                    frac = min(ingest.global_step / total, 1.0)
                    progress = lifecycle.progress_of(job, running=frac)
                    elapsed = (utcnow() - job.started_at).total_seconds() if job.started_at else 0.0
                    eta = (
                        utcnow() + timedelta(seconds=elapsed * (1 - progress) / progress)
                        if progress > 0.05
                        else None
                    )
                    renew(
                        s,
                        job_id,
                        settings,
                        owner,
                        progress=progress,
                        estimated_finish=eta,
                        phase=seen.public(step),
                    )
                    last_beat = now
                if stopping is None:
                    if job.control == "pause":
                        stopping = "pause"
                    elif costs.budget_exhausted(
                        accrued_usd=job.accrued_usd,
                        max_cost_usd=max_cost,
                        interval_usd=costs.interval_usd(
                            settings.cost_interval_s, num_gpus=num_gpus, gpu_type=gpu_type
                        ),
                    ):
                        stopping = "budget"
                        add_event(
                            session=s,
                            job=job,
                            type_="budget_reached",
                            level="warn",
                            step=step,
                            message=f"pausing: accrued ${job.accrued_usd:.6f}; another interval and the stop "
                            f"would pass max_cost_usd ${max_cost}",
                            data={"accrued_usd": job.accrued_usd},
                        )
                    elif SHUTDOWN.is_set():
                        stopping = "shutdown"
                    if stopping and not running:  # still in the scheduler's queue: nothing to checkpoint
                        _stop(run, 0, s, settings, job_id, owner)
                        break
                    if stopping:
                        (step_dir / STOP_FILE).write_text(stopping)
                        stop_deadline = now + settings.step_grace_s
                elif now > stop_deadline:
                    _stop(run, 10, s, settings, job_id, owner)
            time.sleep(0.5)
    except LeaseLostError:
        run.stop(10)
        return Outcome("lost")
    except BaseException:
        with _renewing(settings, job_id, owner):
            run.stop(10)
        raise
    finally:
        ingest.enqueue_evals()
    seconds = time.monotonic() - started
    if (step_dir / "summary.json").is_file():
        return Outcome("succeeded", f"{seconds:.1f}")
    if stopping:
        return Outcome("requeued" if stopping == "shutdown" else "paused", stopping)
    if ended is None:  # stopped while queued (handled above); defensive
        return Outcome("lost")
    # a newer attempt owns the folder: this worker lost the job
    if ended.code == fencing.EXIT_SUPERSEDED:
        return Outcome("lost")
    if ended.failed_because:  # the scheduler can never run it as asked
        return Outcome("failed", f"step {step} ({command}) {ended.failed_because}")
    if ended.killed_by:  # the OOM killer, an operator, the scheduler: not the step's own failure
        return Outcome("killed", f"step {step} ({command}) {ended.killed_by}", ended.resumable)
    tail = log.read_bytes()[-2000:].decode(errors="replace").strip().splitlines() if log.is_file() else []
    reason = next((ln for ln in reversed(tail) if ln.startswith("rlhf: error:")), tail[-1] if tail else "")
    return Outcome("failed", f"step {step} ({command}) exited with status {ended.code}: {reason}")


def _stop(
    run: launchers.StepRun, grace: float, s: Session, settings: Settings, job_id: str, owner: str
) -> None:
    """Stop the step's run from inside the follow loop's session, renewing the lease meanwhile. The
    session is committed first: it may hold the job's row (a cost interval, a heartbeat written this
    pass), and the renewal writes that row from another connection — it would wait for this session,
    which waits for the renewal thread to end, until the thread's join gives up (heartbeat + 30 s)."""
    s.commit()
    with _renewing(settings, job_id, owner):
        run.stop(grace)


@contextlib.contextmanager
def _renewing(settings: Settings, job_id: str, owner: str) -> Iterator[None]:
    """Renew the job's lease every heartbeat while the body blocks (stopping or cancelling a scheduler's
    job can take longer than the lease): the sweeper must not hand the job to another worker meanwhile."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(settings.heartbeat_s):
            try:
                _renew_quietly(settings, job_id, owner)
            except Exception:  # the lease is gone, or the database away: the caller finds out next
                return

    thread = threading.Thread(target=beat, name=f"renew-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=settings.heartbeat_s + 30)


def _queued(run: launchers.StepRun, watch: PhaseWatch) -> Seen:
    """The phase of a step still in the scheduler's queue (no stall bound runs while it waits)."""
    label = run.waiting() or "waiting in the scheduler's queue"
    return Seen("scheduled", label, watch.started, time.time(), None, watch.floor_s, None)


def _next_interval(settings: Settings, job_id: str, step: int, attempt: int) -> int:
    from sqlalchemy import func

    with session_scope(settings.db_url) as s:
        last = s.scalar(
            select(func.max(CostInterval.interval)).where(
                CostInterval.job_id == job_id, CostInterval.step == step, CostInterval.attempt == attempt
            )
        )
    return 0 if last is None else last + 1


def _accrue(
    s: Session,
    job_id: str,
    step: int,
    attempt: int,
    interval: int,
    seconds: float,
    num_gpus: int,
    gpu_type: str,
) -> None:
    usd = costs.interval_usd(seconds, num_gpus=num_gpus, gpu_type=gpu_type)
    try:
        with s.begin_nested():
            s.add(
                CostInterval(
                    job_id=job_id, step=step, attempt=attempt, interval=interval, seconds=seconds, usd=usd
                )
            )
    except IntegrityError:
        return  # already counted
    s.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(accrued_usd=Job.accrued_usd + usd, gpu_seconds=Job.gpu_seconds + seconds * num_gpus)
        .execution_options(synchronize_session=False)
    )


# ---------------------------------------------------------------------------- the job


def train_job(job_id: str, settings: Settings) -> str:
    owner = WORKER_ID
    with session_scope(settings.db_url) as s:
        job = lifecycle.claim(session=s, job_id=job_id, owner=owner, settings=settings)
        if job is None:
            logger.info(
                "job %s: not claimed (finished, paused, cancelled or another worker holds it)", job_id
            )
            return "skipped"
        add_event(
            session=s,
            job=job,
            type_="job_started",
            message=f"worker {owner} took the job (attempt {job.attempts})",
        )
        steps, plan, out, method = list(job.steps), job.plan, Path(job.output_dir), job.method
    try:
        # every model a step reads (model_name_or_path, and step 3's actor_/critic_/reward_…): a grader job
        # whose step 3 starts from a bundled base reads it as actor_model_name_or_path
        refs = {
            Path(v)
            for opts in plan.values()
            for k, v in opts.items()
            if k.endswith("model_name_or_path") and v
        }
        for ref in sorted(refs):
            _ensure_model(ref, job_id, settings, owner)
        for step in steps:
            step_dir = out / _step_of(method, step).dir
            if (step_dir / "summary.json").is_file():  # finished by an earlier attempt
                again = Ingest(job_id, step, step_dir, settings)
                with session_scope(settings.db_url) as s:
                    again.run(s)
                again.enqueue_evals()
                _step_succeeded(settings, job_id, owner, step, step_dir)
                continue
            before = _last_checkpoint(settings, job_id, step)
            outcome = run_job_step(job_id, step, settings, owner)
            restarts, tries = 0, 1
            while outcome.kind in ("killed", "stalled"):  # bounded: a restart used, or the checkpoint went on
                reached = _last_checkpoint(settings, job_id, step)
                went_on = outcome.resumable and reached > before  # a time limit, with work kept: a chain
                if not went_on and restarts == settings.step_restarts:
                    break
                restarts += 0 if went_on else 1
                before, tries = reached, tries + 1
                if went_on:
                    message = (
                        f"{outcome.message} after saving its checkpoint at step {reached}; submitted again "
                        f"from it (it made progress: not one of the {settings.step_restarts} restarts)"
                    )
                else:  # a stall has its own event already
                    message = (
                        outcome.message + "; restarting it"
                        if outcome.kind == "killed"
                        else f"restarting step {step}"
                    ) + f" from its last checkpoint ({restarts} of {settings.step_restarts})"
                with session_scope(settings.db_url) as s:
                    job = renew(s, job_id, settings, owner)
                    add_event(
                        session=s, job=job, type_="step_restarted", level="warn", step=step, message=message
                    )
                outcome = run_job_step(job_id, step, settings, owner)
            if outcome.kind in ("killed", "stalled"):
                outcome = Outcome("failed", f"{outcome.message} (the last of {tries} attempts)")
            if outcome.kind == "succeeded":
                _step_succeeded(settings, job_id, owner, step, step_dir)
                continue
            return _finish(settings, job_id, owner, outcome, step)
        return _finish(settings, job_id, owner, Outcome("succeeded"), steps[-1])
    except LeaseLostError:
        return "lost"
    except Exception as e:  # a bug or an environment problem: the job fails with the reason, never silently
        logger.exception("job %s failed", job_id)
        return _finish(settings, job_id, owner, Outcome("failed", f"{type(e).__name__}: {e}"), None)


def _last_checkpoint(settings: Settings, job_id: str, step: int) -> int:
    """The global step of the step's newest checkpoint on record (0: none)."""
    from sqlalchemy import func

    with session_scope(settings.db_url) as s:
        last = s.scalar(
            select(func.max(JobCheckpoint.global_step)).where(
                JobCheckpoint.job_id == job_id, JobCheckpoint.step == step
            )
        )
    return int(last or 0)


def _step_succeeded(settings: Settings, job_id: str, owner: str, step: int, step_dir: Path) -> None:
    with session_scope(settings.db_url) as s:
        summary = (
            json.loads((step_dir / "summary.json").read_text())
            if (step_dir / "summary.json").is_file()
            else {}
        )
        tokens = sum(
            int(v.get("tokens", 0) or 0)
            for v in s.scalars(
                select(JobMetric.values).where(JobMetric.job_id == job_id, JobMetric.step == step)
            )
        )
        job = lifecycle.set_step(
            session=s,
            job_id=job_id,
            owner=owner,
            settings=settings,
            step=step,
            status="succeeded",
            tokens=tokens,
        )
        memory = _record_peak(s, job, step, summary)
        _final_checkpoint(s, job_id, step, step_dir / ("actor" if step == 3 else ""))
        add_event(
            session=s,
            job=job,
            type_="step_succeeded",
            step=step,
            message=f"step {step} ({_step_of(job.method, step).command}) succeeded: {tokens} tokens{memory}",
            data={
                "seconds": summary.get("seconds"),
                "summary": {
                    k: v for k, v in summary.items() if isinstance(v, int | float | str) and k != "options"
                },
            },
            source_key=f"step_succeeded:{step}",
        )


def _record_peak(s: Session, job: Job, step: int, summary: dict[str, Any]) -> str:
    """The step's measured peak memory (its summary) beside the planned one (the job's memory plan), on the
    step's last metric point (so in the job's metrics and its final checkpoint); said in the event."""
    measured = summary.get("peak_memory_mib")
    planned = ((job.request or {}).get("_memory") or {}).get(str(step), {}).get("per_gpu_bytes")
    values = {"peak_memory_mib": measured} if isinstance(measured, int | float) else {}
    if isinstance(planned, int | float):
        values["planned_peak_mib"] = round(planned / 2**20, 1)
    last = s.scalar(
        select(JobMetric)
        .where(JobMetric.job_id == job.id, JobMetric.step == step)
        .order_by(JobMetric.global_step.desc())
        .limit(1)
    )
    if last is None or not values:
        return ""
    last.values = {**last.values, **values}
    planned_mib = values.get("planned_peak_mib")
    if "peak_memory_mib" not in values:
        return f"; planned tensor memory {planned_mib:.0f} MiB" if planned_mib is not None else ""
    if summary.get("peak_memory_source") == "cuda_max_memory_allocated":  # like with like: tensors on the GPU
        plan = f", planned {planned_mib:.0f} MiB" if planned_mib is not None else ""
        return f"; peak tensor memory {measured:.0f} MiB (the CUDA allocator's){plan}"
    # a CPU has no allocator peak: the process's resident set counts the interpreter and libraries too
    plan = f"; the plan's {planned_mib:.0f} MiB counts tensors only" if planned_mib is not None else ""
    return f"; peak resident memory {measured:.0f} MiB (the whole process, ru_maxrss{plan})"


def _final_checkpoint(s: Session, job_id: str, step: int, model_dir: Path) -> None:
    """A step's final model is one of the job's checkpoints (OpenAI always lists the final one), at the
    step's last global step, with its last metrics; a mid-run save at that same step becomes it."""
    last = s.scalar(
        select(JobMetric)
        .where(JobMetric.job_id == job_id, JobMetric.step == step)
        .order_by(JobMetric.global_step.desc())
        .limit(1)
    )
    gs = last.global_step if last is not None else 0
    metrics = {
        k: v for k, v in (last.values if last is not None else {}).items() if isinstance(v, int | float)
    }
    row = s.scalar(
        select(JobCheckpoint).where(
            JobCheckpoint.job_id == job_id, JobCheckpoint.step == step, JobCheckpoint.global_step == gs
        )
    )
    if row is None:
        s.add(
            JobCheckpoint(
                job_id=job_id, step=step, global_step=gs, path=str(model_dir), metrics=metrics | {"final": 1}
            )
        )
    elif not (row.metrics or {}).get("final"):
        row.path, row.metrics = str(model_dir), (row.metrics or {}) | metrics | {"final": 1}


def _finish(settings: Settings, job_id: str, owner: str, outcome: Outcome, step: int | None) -> str:
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        models, main_id = _fine_tuned_models(job) if outcome.kind == "succeeded" else ({}, None)
        done = lifecycle.finish(
            session=s,
            job_id=job_id,
            owner=owner,
            outcome=outcome.kind,
            step=step,
            message=outcome.message,
            models=models,
            fine_tuned_model=main_id,
        )
        if done in ("succeeded", "failed"):
            _results_file(s, job_id, settings)
        evals = _final_evals(s, job_id, settings) if done == "succeeded" else []
    if evals:
        from service.queue import enqueue_eval

        for run_id in evals:
            enqueue_eval(run_id, settings)
    if done == "requeued":
        from service.queue import enqueue_training

        enqueue_training(job_id, settings)
    return done


def _final_evals(s: Session, job_id: str, settings: Settings) -> list[str]:
    """The job's evals on its final model (every: final and every: checkpoint alike)."""
    from service.services import evals as evals_svc

    job = s.get(Job, job_id, populate_existing=True)
    if job is None or not job.fine_tuned_model or not (job.request or {}).get("evals"):
        return []
    return evals_svc.job_runs(
        session=s,
        job=job,
        model=job.fine_tuned_model,
        every=("checkpoint", "final"),
        label="final",
        settings=settings,
    )


def _results_file(s: Session, job_id: str, settings: Settings) -> None:
    """The job's results CSV (OpenAI's `result_files`): written once the job has ended, when training
    logged anything — a job that failed after training started gets one too."""
    job = s.get(Job, job_id, populate_existing=True)
    assert job is not None
    if job.result_files:
        return
    points = [
        (m.step, m.global_step, m.values)
        for m in s.scalars(
            select(JobMetric)
            .where(JobMetric.job_id == job_id)
            .order_by(JobMetric.step, JobMetric.global_step)
        )
    ]
    if not points:
        return
    content, rows = results.results_csv(points, multi_step=len(job.steps) > 1)
    f = files_svc.register_results(
        session=s,
        tenant=job.tenant_id,
        filename=f"step_metrics_{job.id}.csv",
        content=content,
        files_dir=settings.files_dir,
        rows=rows,
    )
    job.result_files = [f.id]


def _fine_tuned_models(job: Job) -> tuple[dict[str, Path], str]:
    """The models a finished job registers (id → folder; only folders holding a model) and its main id."""
    out = Path(job.output_dir)
    main_id = job_model_id(job)
    if job.method == "dpo":
        paths = {main_id: out / _step_of("dpo", 2).dir, f"{main_id}:sft": out / _step_of("dpo", 1).dir}
    elif 3 in job.steps:
        paths = {main_id: out / "step3_rlhf" / "actor", f"{main_id}:sft": out / "step1_sft"}
        if (out / "step3_rlhf" / "actor_ema" / "config.json").is_file():
            paths[f"{main_id}:ema"] = out / "step3_rlhf" / "actor_ema"
    else:
        paths = {main_id: out / "step1_sft"}
    return {k: p for k, p in paths.items() if (p / "config.json").is_file()}, main_id


# ---------------------------------------------------------------------------- sweeper


def sweep(settings: Settings) -> list[str]:
    """Re-enqueue jobs that lost their message or their worker (returns the ids re-enqueued), and delete the
    files past their expiry."""
    from service.queue import enqueue_training

    with session_scope(settings.db_url) as s:
        out = lifecycle.sweep(session=s, settings=settings)
        files_svc.purge_expired(session=s)  # files past their expires_after
    for job_id in out:
        enqueue_training(job_id, settings)
    return out


def sweeper_loop(settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(settings.sweep_s):
        try:
            ids = sweep(settings)
            if ids:
                logger.info("sweeper re-enqueued %s", ", ".join(ids))
        except Exception:
            logger.exception("sweep failed")
