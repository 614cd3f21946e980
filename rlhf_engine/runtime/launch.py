"""Running a step under the DeepSpeed launcher (or torchrun) with several processes.

`rlhf sft --num-gpus 2 …` re-runs itself as `deepspeed --num_gpus 2 --module rlhf_engine.cli sft …`;
the children see `RANK` in their environment and train instead of relaunching. Inside a Slurm
allocation (`--launcher srun --nodes N`, the batch script the `slurm` backend writes) the ranks are
`srun` tasks on every node, each given torch.distributed's variables from Slurm's (SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS); the batch script sets MASTER_ADDR (the first host of the allocation)
and MASTER_PORT. Success is decided
by the step's completion marker (summary.json), not by the launcher's exit code: two-process CPU
runs can abort at exit after finishing correctly (docs/cpu.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from rlhf_engine.runtime.distributed import free_port
from rlhf_engine.runtime.fencing import WATCH_ENV

Launcher = Literal["deepspeed", "torchrun", "srun", "mpirun"]
# what a rank on another node needs of this process's environment (DeepSpeed's pdsh runner starts it
# over ssh with a fresh one and exports only what its DS_ENV_FILE lists)
NODE_ENV_PREFIXES = ("RLHF_", "DS_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "OMP_", "TORCH_", "PYTORCH_")
NODE_ENV_FILE = ".deepspeed_env"
# the worker's secrets, never passed to a rank or step on another machine (an sbatch job's exported
# environment, a TrainJob's spec, a hostfile run's env file): the database and broker, the API's tokens,
# hub tokens. The judge token is the step's own (scoped to its job's judge route) and is passed.
SECRET_MARKS = ("DATABASE_URL", "REDIS_URL", "PASSWORD", "SECRET", "API_KEY", "TOKEN", "CREDENTIAL")
SECRETS_ALLOWED = frozenset({"RLHF_JUDGE_TOKEN"})


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the worker's secrets (what a step needs is kept: paths, its attempt, offline flags)."""
    return {
        k: v for k, v in env.items() if k in SECRETS_ALLOWED or not any(m in k.upper() for m in SECRET_MARKS)
    }


# set by a launcher for its workers; a fresh run started from inside one must not inherit them
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def inside_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# one srun task's torch.distributed variables, from Slurm's own (read in the task, not the batch shell)
SRUN_RANK_ENV = (
    "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
    'LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE; exec "$@"'
)


# one mpirun process's torch.distributed variables, from OpenMPI's (Kubeflow Trainer's DeepSpeed runtime
# starts the ranks with mpirun over its hostfile)
MPI_RANK_ENV = (
    "export RANK=$OMPI_COMM_WORLD_RANK LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK "
    'WORLD_SIZE=$OMPI_COMM_WORLD_SIZE LOCAL_WORLD_SIZE=$OMPI_COMM_WORLD_LOCAL_SIZE; exec "$@"'
)
MPI_MASTER_PORT = "29500"


def first_host(hostfile: str) -> str:
    """The first host of a DeepSpeed/OpenMPI hostfile ("name slots=N" lines; # comments)."""
    for line in Path(hostfile).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            return line.split()[0]
    raise ValueError(f"{hostfile}: no host in it")


def launch_command(
    args: Sequence[str],
    *,
    processes: int,
    launcher: Launcher = "deepspeed",
    hostfile: str | None = None,
    nodes: int = 1,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The command that runs `rlhf <args>` as `processes` workers (per node, with a hostfile, srun or
    mpirun)."""
    if launcher == "mpirun":
        if not hostfile:
            raise ValueError("--launcher mpirun needs --hostfile (Kubeflow Trainer's: /etc/mpi/hostfile)")
        env = os.environ if env is None else env
        exports = sorted(k for k in env if k.startswith(NODE_ENV_PREFIXES) or k.startswith("MASTER_"))
        return [
            "mpirun",
            "--hostfile",
            hostfile,
            "-np",
            str(nodes * processes),
            "--map-by",
            f"ppr:{processes}:node",
            "--bind-to",
            "none",
            *(x for k in exports if k != WATCH_ENV for x in ("-x", k)),
            "bash",
            "-c",
            MPI_RANK_ENV,
            "rank",
            sys.executable,
            "-m",
            "rlhf_engine.cli",
            *args,
        ]
    if launcher == "srun":
        env = os.environ if env is None else env
        # since Slurm 22.05 srun does not inherit the allocation's --cpus-per-task: pass it on
        cpus = [f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}"] if env.get("SLURM_CPUS_PER_TASK") else []
        return [
            "srun",
            f"--nodes={nodes}",
            f"--ntasks-per-node={processes}",
            *cpus,
            "--kill-on-bad-exit=1",
            "bash",
            "-c",
            SRUN_RANK_ENV,
            "rank",
            sys.executable,
            "-m",
            "rlhf_engine.cli",
            *args,
        ]
    port = str(free_port())
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={port}",
            "-m",
            "rlhf_engine.cli",
            *args,
        ]
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(processes),
        "--master_port",
        port,
        "--no_local_rank",
    ]  # LOCAL_RANK is in the environment; no --local_rank flag for our parser
    if hostfile:
        cmd += ["--hostfile", hostfile]
    return [*cmd, "--module", "rlhf_engine.cli", *args]


def run_launched(
    args: Sequence[str],
    *,
    processes: int,
    launcher: Launcher,
    marker: Path,
    hostfile: str | None = None,
    nodes: int = 1,
) -> int:
    """Run the step's workers and wait; 0 if the step's summary.json exists afterwards."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # N processes on a few cores: no thread oversubscription
    if launcher == "srun":  # ranks on other nodes cannot watch a pid here; Slurm ends them with the job
        env.pop(WATCH_ENV, None)
        missing = [k for k in ("SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(
                f"--launcher srun runs inside a Slurm allocation with MASTER_ADDR and MASTER_PORT set "
                f"(the slurm backend's batch script); missing: {', '.join(missing)}"
            )
    elif launcher == "mpirun":  # ranks on other hosts; mpirun exports the environment (-x) itself
        env.pop(WATCH_ENV, None)
        env.setdefault("MASTER_ADDR", first_host(hostfile or ""))
        env.setdefault("MASTER_PORT", MPI_MASTER_PORT)
    elif hostfile:  # ranks on other hosts: they cannot watch a pid here; they need this environment
        env.pop(WATCH_ENV, None)
        env["DS_ENV_FILE"] = str(_node_env_file(marker.parent, env))
    else:
        env[WATCH_ENV] = str(os.getpid())  # the ranks stop when this process ends (fencing.py)
    cmd = launch_command(
        args, processes=processes, launcher=launcher, hostfile=hostfile, nodes=nodes, env=env
    )
    proc = subprocess.Popen(cmd, env=env)
    forwarding = launcher in ("srun", "mpirun") and threading.current_thread() is threading.main_thread()
    if forwarding:  # a scheduler's SIGTERM (time limit, preemption, scancel, a TrainJob deleted) reaches
        # this process: pass it to srun/mpirun, which pass it to every rank (each checkpoints and exits)
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        # bounded: the ranks end with the step (finished, stopped, or this process gone: fencing's watchdog)
        code = proc.wait()
    finally:
        if forwarding:
            signal.signal(signal.SIGTERM, previous)
    if marker.is_file():
        return 0
    return code or 1


def _node_env_file(step_dir: Path, env: dict[str, str]) -> Path:
    """The environment DeepSpeed's multi-node runner exports on every host (its `.deepspeed_env`
    format, one KEY=VALUE a line): the user's own ~/.deepspeed_env first, then ours (the fencing token,
    the accelerator, offline flags, thread counts)."""
    lines = []
    own = Path.home() / NODE_ENV_FILE
    if own.is_file():
        lines += [ln for ln in own.read_text().splitlines() if "=" in ln]
    for key, value in sorted(without_secrets(env).items()):
        if key.startswith(NODE_ENV_PREFIXES) and key not in (WATCH_ENV, "DS_ENV_FILE") and "\n" not in value:
            lines.append(f"{key}={value}")
    step_dir.mkdir(parents=True, exist_ok=True)
    path = step_dir / NODE_ENV_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the judge token is in it
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path
