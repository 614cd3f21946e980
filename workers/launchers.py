"""Where a step runs: a process group on this machine (`local`), a batch job of the cluster's Slurm
(`slurm`) or a Kubeflow Trainer TrainJob (`kubernetes`, workers/kube.py), chosen by
`RLHF_LAUNCH_BACKEND`.

The training task (workers/training.py) owns the job either way: it starts the step through a
backend, follows it (`poll`), stops it (`stop`), and reads the step's progress from the run directory
— `metrics.jsonl`, `events.jsonl`, `phase.json`, `summary.json` in `STEP_DIR`. Under Slurm that
directory must be on a file system the worker and every compute node share (NFS, Lustre, GPFS: what
an HPC centre already mounts on its login and compute nodes). A shared directory, not an object
store, because the step's one-trainer guards already live there (the fencing token and the writer
lock, rlhf_engine/runtime/fencing.py) and checkpoints are written and resumed there by DeepSpeed
itself; the worker reads only appended lines.

One trainer whatever dies: the step never watches the worker's pid under Slurm (it runs on another
machine); instead a new attempt raises the folder's fence (the old step stops without writing) and
`scancel`s the scheduler job recorded in `STEP_DIR/.slurm_job` by the attempt before it.

Stdlib only, and no torch: the worker imports this module.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from rlhf_engine.runtime.launch import without_secrets
from rlhf_engine.runtime.stopping import EXIT_STOPPED
from service.settings import Settings
from workers.step_runs import (
    Ended,
    LaunchError,
    StepRun,
    StepSpec,
    SupersededLaunchError,
    limit_minutes,
)

logger = logging.getLogger(__name__)

SLURM_JOB_FILE = ".slurm_job"  # the scheduler job of the step folder's current attempt
# the states a job ends in (anything else — PENDING, RUNNING, COMPLETING, REQUEUED, SUSPENDED, SIGNALING,
# STAGE_OUT, a hold … — is followed on)
SLURM_TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "OUT_OF_MEMORY",
    "DEADLINE",
}
SLURM_WAITING = {"PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
# why the scheduler ended a job that did not exit by itself: not the step's own failure (retried)
SLURM_ENDED = {
    "CANCELLED": "was cancelled (scancel)",
    "NODE_FAIL": "lost a node",
    "TIMEOUT": "reached its time limit",
    "PREEMPTED": "was preempted",
    "BOOT_FAIL": "could not boot its node",
    "OUT_OF_MEMORY": "ran out of memory",
    "DEADLINE": "passed its deadline",
}
# a pending reason that no wait can clear: the step fails with it at once
SLURM_NEVER = {
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "AssocMaxNodesPerJobLimit",
    "QOSMaxNodePerJobLimit",
}
# sbatch/squeue output that means the controller is away (retried), not that the job is unknown
SLURM_OUTAGE = ("Unable to contact slurm controller", "Socket timed out", "Connection refused", "Zero Bytes")
SLURM_CMD_TIMEOUT_S = 30.0  # a scheduler command that takes longer is a scheduler outage


# ---------------------------------------------------------------------------- local


class LocalRun:
    """The step as a child process group on this machine (DeepSpeed's launcher inside it for N > 1)."""

    def __init__(self, spec: StepSpec) -> None:
        argv = list(spec.argv)
        if spec.per_node > 1:
            argv += ["--num-gpus", str(spec.per_node)]
        with open(spec.log, "ab") as logf:
            self.proc = subprocess.Popen(
                argv, stdout=logf, stderr=subprocess.STDOUT, env=spec.env, start_new_session=True
            )
        self.label = f"pid {self.proc.pid}"

    def poll(self) -> Ended | None:
        code = self.proc.poll()
        if code is None:
            return None
        killed = f"was killed by signal {-code}" if code < 0 else ""
        return Ended(code, killed)

    def running(self) -> bool:
        return True

    def waiting(self) -> str:
        return ""

    def stop(self, grace: float) -> None:
        proc = self.proc
        if proc.poll() is not None:
            return
        try:
            if grace <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)  # bounded: SIGKILL cannot be refused


# ---------------------------------------------------------------------------- slurm


def _slurm_run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A Slurm command, bounded; LaunchError when it is missing or does not answer in time."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=SLURM_CMD_TIMEOUT_S, env=env)
    except FileNotFoundError as e:
        raise LaunchError(f"`{args[0]}` is not installed on this worker (RLHF_LAUNCH_BACKEND=slurm)") from e
    except subprocess.TimeoutExpired as e:
        raise LaunchError(f"`{args[0]}` did not answer in {SLURM_CMD_TIMEOUT_S:.0f} s") from e


def _slurm(args: list[str], *, check: bool = True) -> str:
    done = _slurm_run(args)
    if check and done.returncode != 0:
        raise LaunchError((done.stderr or done.stdout).strip() or f"`{args[0]}` exited {done.returncode}")
    return done.stdout


def _outage(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode != 0 and any(w in done.stderr + done.stdout for w in SLURM_OUTAGE)


def time_limit(estimate_s: float | None, settings: Settings, max_minutes: int | None = None) -> str:
    """`--time` (D-HH:MM:SS) from the plan's estimate, at most the partition's MaxTime (`max_minutes`): a
    step that reaches it is stopped (SIGTERM first: it checkpoints) and resumed by the next attempt, so a
    step longer than the partition allows runs as a chain of jobs."""
    minutes = limit_minutes(
        estimate_s, factor=settings.step_time_factor, floor_min=settings.step_min_time_min
    )
    if max_minutes:
        minutes = min(minutes, max_minutes)
    return f"{minutes // 1440}-{minutes % 1440 // 60:02d}:{minutes % 60:02d}:00"


def slurm_minutes(value: str) -> int | None:
    """Slurm's time format (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes; None for
    UNLIMITED, INFINITE or anything else."""
    days, _, rest = value.partition("-") if "-" in value else ("0", "", value)
    parts = rest.split(":")
    if not days.isdigit() or not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    n = [int(p) for p in parts]
    if "-" in value:  # D-HH[:MM[:SS]]
        hours, minutes = n[0], n[1] if len(n) > 1 else 0
    else:  # MM, MM:SS, HH:MM:SS
        hours, minutes = (n[0], n[1]) if len(n) == 3 else (0, n[0])
    return int(days) * 1440 + hours * 60 + minutes


def partition_max_minutes(partition: str) -> int | None:
    """MaxTime of `partition` (the cluster's default partition when ""), in minutes; None when unlimited
    or when the controller does not say (sbatch then judges `--time` itself)."""
    try:
        out = _slurm(
            ["scontrol", "show", "partition", "-o", *([partition] if partition else [])], check=False
        )
    except LaunchError:
        return None
    for line in out.splitlines():
        if partition or re.search(r"\bDefault=YES\b", line):
            found = re.search(r"\bMaxTime=(\S+)", line)
            return slurm_minutes(found.group(1)) if found else None
    return None


def batch_script(spec: StepSpec, settings: Settings, max_minutes: int | None = None) -> str:
    """The step's sbatch script: one task per process on every node (`srun`), each with
    torch.distributed's variables from Slurm's (rank, local rank, world size, master = first host of
    SLURM_JOB_NODELIST); a one-process step runs in the batch shell itself."""
    name = job_name(spec)
    if re.search(r"\s", str(spec.log)):  # an #SBATCH line ends at whitespace: the path would be cut
        raise LaunchError(
            f"the run directory {spec.log.parent} has whitespace in it; Slurm's --output cannot"
        )
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={spec.nodes}",
        f"#SBATCH --ntasks-per-node={spec.per_node}",
        f"#SBATCH --time={time_limit(spec.estimate_s, settings, max_minutes)}",
        f"#SBATCH --output={spec.log}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",  # a node failure queues it again; it resumes from its checkpoint
        # before the time limit: SIGTERM to the batch shell's process, the step's top process (it checkpoints,
        # or forwards it to its srun ranks, which do)
        f"#SBATCH --signal=B:TERM@{max(int(settings.step_grace_s), 30)}",
    ]
    if spec.gpus:
        lines.append(f"#SBATCH --gpus-per-node={spec.per_node}")
    if settings.slurm_cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={settings.slurm_cpus_per_task}")
    if settings.slurm_partition:
        lines.append(f"#SBATCH --partition={settings.slurm_partition}")
    if settings.slurm_account:
        lines.append(f"#SBATCH --account={settings.slurm_account}")
    lines += [f"#SBATCH {a}" for a in settings.slurm_extra_args]
    lines += [
        "set -euo pipefail",
        f'echo "rlhf: step {spec.step} of job {spec.job_id}, attempt {spec.attempt}: slurm job '
        '$SLURM_JOB_ID on $SLURM_JOB_NODELIST"',
    ]
    argv = " ".join(shlex.quote(a) for a in spec.argv)
    if spec.nodes * spec.per_node == 1:
        lines.append(f"exec {argv}")
    else:  # the step's top process (holds the folder) runs one `srun` task per rank on every node
        lines += [
            'MASTER_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            # the node's address where the cluster gives one (NodeAddr), else its name
            'MASTER_ADDR="$(scontrol show node "$MASTER_NODE" 2>/dev/null '
            "| sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')\"",
            'MASTER_ADDR="${MASTER_ADDR:-$MASTER_NODE}"',
            "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
            "export MASTER_ADDR MASTER_PORT",
            f"exec {argv} --num-gpus {spec.per_node} --nodes {spec.nodes} --launcher srun",
        ]
    return "\n".join(lines) + "\n"


class SlurmRun:
    """The step as a Slurm batch job; followed with squeue (then scontrol/sacct for how it ended). A
    controller that does not answer is an outage: followed on, never taken for the job's end."""

    def __init__(self, spec: StepSpec, settings: Settings) -> None:
        from rlhf_engine.runtime.fencing import read_fence

        self.settings = settings
        name = job_name(spec)
        cancel_earlier(spec.step_dir, name, wait_s=settings.step_grace_s + 60)
        if (read_fence(spec.step_dir) or 0) > spec.attempt:  # a newer attempt took the folder meanwhile
            raise SupersededLaunchError(f"attempt {spec.attempt} of step {spec.step} was superseded")
        script = spec.step_dir.parent / "slurm" / f"step{spec.step}-attempt{spec.attempt}.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(batch_script(spec, settings, partition_max_minutes(settings.slurm_partition)))
        env = without_secrets(spec.env)  # what sbatch exports to the job: never the worker's secrets
        env.pop("SLURM_JOB_ID", None)  # a worker that itself runs inside an allocation submits anew
        for wait in (0, 5, 15, 30):  # a controller that is briefly away (a restart, a failover)
            time.sleep(wait)
            done = _slurm_run(["sbatch", "--parsable", str(script)], env=env)
            if not _outage(done):
                break
        if done.returncode != 0:
            raise LaunchError(f"sbatch refused the step: {(done.stderr or done.stdout).strip()}")
        self.job = done.stdout.strip().split(";")[0]
        (spec.step_dir / SLURM_JOB_FILE).write_text(json.dumps({"job": self.job, "attempt": spec.attempt}))
        self.label = f"slurm job {self.job}"
        self.state, self.reason = "PENDING", ""
        self.ended: Ended | None = None
        self.checked = 0.0

    def _refresh(self) -> None:
        if self.ended is not None or time.monotonic() - self.checked < self.settings.slurm_poll_s:
            return
        self.checked = time.monotonic()
        try:
            done = _slurm_run(["squeue", "-h", "-j", self.job, "-o", "%T|%r"])
        except LaunchError as e:  # the controller is away: keep following, say why
            self.reason = str(e)
            return
        out = done.stdout.strip()
        if done.returncode != 0 and "Invalid job id" not in done.stderr:
            self.reason = f"the Slurm controller does not answer: {done.stderr.strip()[:200]}"
            return
        if out:
            self.state, _, self.reason = out.splitlines()[0].partition("|")
            if self.state in SLURM_WAITING and self.reason in SLURM_NEVER:
                _slurm(["scancel", self.job], check=False)
                why = f"cannot be started by Slurm: {self.reason} (slurm job {self.job})"
                self.ended = Ended(1, "", why)
                return
            if self.state not in SLURM_TERMINAL:
                return
        self.ended = self._how_it_ended()

    def _how_it_ended(self) -> Ended | None:
        """The job's final state and exit code: scontrol while the controller remembers it (MinJobAge),
        else sacct where accounting is kept; None while either says it still lives; a job neither knows
        is taken as ended (its step folder's summary.json decides whether it succeeded)."""
        state, code = "", ""
        with contextlib.suppress(LaunchError):
            out = _slurm(["scontrol", "show", "job", "-o", self.job], check=False)
            state = m.group(1) if (m := re.search(r"\bJobState=(\S+)", out)) else ""
            code = m.group(1) if (m := re.search(r"\bExitCode=(\S+)", out)) else ""
        if not state:
            with contextlib.suppress(LaunchError):
                out = _slurm(["sacct", "-n", "-X", "-P", "-j", self.job, "-o", "State,ExitCode"], check=False)
                if out.strip() and "|" in out:
                    state, code = out.strip().splitlines()[0].split("|")[:2]
        state = state.split()[0] if state else "UNKNOWN"
        if state != "UNKNOWN" and state not in SLURM_TERMINAL:
            self.state = state
            return None  # squeue missed it (a controller restart, a race): still the scheduler's
        self.state = state
        status, _, sig = code.partition(":")
        exit_code = int(status) if status.isdigit() else 1
        if sig.isdigit() and int(sig):
            exit_code = -int(sig)
        if state in SLURM_ENDED:
            why = f"{SLURM_ENDED[state]}: slurm job {self.job}"
            resumable = state in ("TIMEOUT", "PREEMPTED")
            return Ended(exit_code if exit_code else -signal.SIGTERM, why, resumable=resumable)
        if exit_code < 0:
            return Ended(exit_code, f"was killed by signal {-exit_code}: slurm job {self.job}")
        if exit_code == EXIT_STOPPED:  # it checkpointed on Slurm's SIGTERM (time limit, preemption)
            why = f"was stopped by Slurm's signal and checkpointed: slurm job {self.job}"
            return Ended(exit_code, why, resumable=True)
        return Ended(exit_code, "")

    def poll(self) -> Ended | None:
        self._refresh()
        return self.ended

    def running(self) -> bool:
        self._refresh()
        return self.ended is not None or self.state not in SLURM_WAITING

    def waiting(self) -> str:
        return "" if self.running() else f"waiting in the Slurm queue ({self.reason or self.state})"

    def stop(self, grace: float) -> None:
        if self.poll() is not None:
            return
        deadline = time.monotonic() + max(grace, 0)
        if grace > 0 and self.running():  # SIGTERM to the batch shell and every task: checkpoint
            with contextlib.suppress(LaunchError):
                _slurm(["scancel", "--full", "--signal=TERM", self.job])
            while time.monotonic() < deadline and self._gone() is None:
                time.sleep(1)
        with contextlib.suppress(LaunchError):
            _slurm(["scancel", self.job])
        end = time.monotonic() + 60  # bounded: the scheduler kills after its KillWait
        while time.monotonic() < end and self._gone() is None:
            time.sleep(1)

    def _gone(self) -> Ended | None:
        self.checked = 0.0
        return self.poll()


def job_name(spec: StepSpec) -> str:
    return f"rlhf-{spec.job_id}-s{spec.step}"


def cancel_earlier(step_dir: Path, name: str, wait_s: float = 120.0) -> None:
    """`scancel` every scheduler job of this step (by its name, and the one an earlier attempt recorded in
    the folder) and wait for them to leave (at most `wait_s`): the new attempt never trains beside one.
    The fence, raised before, stops an old one writing even if the scheduler is slow to end it."""
    jobs: list[str] = []
    with contextlib.suppress(FileNotFoundError, ValueError):
        earlier = json.loads((step_dir / SLURM_JOB_FILE).read_text())
        if str(earlier.get("job", "")).isdigit():
            jobs.append(str(earlier["job"]))

    def live() -> bool:
        by_name = _slurm_run(["squeue", "-h", "-n", name, "-o", "%i|%T"])
        listed = [ln.split("|") for ln in by_name.stdout.split()]
        found = {j for j, _ in listed} | set(jobs)
        states = _slurm_run(["squeue", "-h", "-j", ",".join(sorted(found)), "-o", "%T"]) if found else None
        return any(st not in ("COMPLETED", "") for st in (states.stdout.split() if states else []))

    try:
        if not live():
            return
        _slurm(["scancel", "--name", name], check=False)
        for job in jobs:
            _slurm(["scancel", job], check=False)
        logger.info("cancelled slurm jobs named %s (an earlier attempt's) in %s", name, step_dir)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not live():
                return
            time.sleep(1)
        logger.warning(
            "slurm jobs named %s still listed %.0f s after scancel; their fence stops them", name, wait_s
        )
    except LaunchError as e:
        logger.warning("could not cancel an earlier attempt's slurm job %s: %s", name, e)


def start(spec: StepSpec, settings: Settings) -> StepRun:
    if settings.launch_backend == "slurm":
        return SlurmRun(spec, settings)
    if settings.launch_backend == "kubernetes":
        from workers.kube import KubeRun  # the kubernetes client only where it is used

        return KubeRun(spec, settings)
    return LocalRun(spec)
