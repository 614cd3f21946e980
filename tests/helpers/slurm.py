"""A real Slurm cluster on this machine, for the tests and the docs' walkthrough: Debian's
`slurm-wlm` and `munge` (`make slurm` installs them), started like PostgreSQL is — by the caller.

    cluster = start(folder)        # munged (if not running), slurmctld, slurmd; waits until the node is idle
    cluster = start(folder, nodes=2)   # two nodes on this machine (a slurmd each, ports of their own)
    env = {"SLURM_CONF": str(cluster.conf)}   # every Slurm command of a process with it talks to this cluster
    cluster.stop()

The configuration lives in `folder` (its own ports, state and logs; nothing under /etc but munge's key,
which the package creates), so a second start (another session, a stale state) never meets the first.
Each node has this machine's CPUs (emulated nodes share them: Slurm's multiple-slurmd mode, each
`slurmd -N nodeK` with its own port and spool, the node's address 127.0.0.1); root runs the jobs (as
the test processes do). No accounting daemon:
`sacct` reports accounting as disabled, and how a job ended is read from `scontrol show job` (the
controller keeps ended jobs for MinJobAge, an hour here).

    python -m tests.helpers.slurm FOLDER [NODES]   # start one and leave it running (docs/slurm.md)
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MUNGE_SOCKET_DIR = Path("/run/munge")
PARTITION = "debug"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class Cluster:
    folder: Path
    conf: Path
    nodes: list[str]
    cpus: int

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str) -> str:
        done = subprocess.run(
            list(args), capture_output=True, text=True, env=os.environ | self.env, timeout=30, check=False
        )
        return done.stdout + done.stderr

    def stop(self) -> None:
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld"]:
            pid_file = self.folder / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().strip())
            except (FileNotFoundError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)


def missing() -> list[str]:
    """The programs this needs that are not installed (empty when all are)."""
    return [p for p in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(p) is None]


def _munge() -> None:
    """munged on its default socket (the one Slurm's auth/munge plugin asks), started once per machine."""
    probe = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=False)
    if probe.returncode == 0:
        return
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=30)
    deadline = time.monotonic() + 20
    while subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=False).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError("munged did not start (see /var/log/munge/munged.log)")
        time.sleep(0.2)


def start(folder: Path, *, nodes: int = 1, cpus: int | None = None) -> Cluster:
    gone = missing()
    if gone:
        raise RuntimeError(f"Slurm is not installed ({', '.join(gone)} missing): run `make slurm`")
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(exist_ok=True)
    host, cpus = socket.gethostname(), cpus or os.cpu_count() or 1
    names = [host] if nodes == 1 else [f"node{i + 1}" for i in range(nodes)]
    node_lines = [
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} State=UNKNOWN"
        for name in names
    ]
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=rlhf-test",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                f"StateSaveLocation={folder / 'state'}",
                f"SlurmdSpoolDir={folder / 'spool'}/%n",
                f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
                f"SlurmdPidFile={folder}/slurmd-%n.pid",
                f"SlurmctldPort={free_port()}",
                f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={folder / 'log'}/slurmd-%n.log",
                "ProctrackType=proctrack/linuxproc",  # no cgroups in a container
                "TaskPlugin=task/none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "MpiDefault=none",
                "ReturnToService=2",
                "MinJobAge=3600",
                "KillWait=10",
                *node_lines,
                # a limit as HPC partitions have (steps longer than it run as chains of jobs)
                f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=2-00:00:00 State=UP",
                "",
            ]
        )
    )
    _munge()
    env = os.environ | {"SLURM_CONF": str(conf)}
    cluster = Cluster(folder=folder, conf=conf, nodes=names, cpus=cpus)
    subprocess.run(["slurmctld"], env=env, check=True, timeout=60)
    for name in names:
        (folder / "spool" / name).mkdir(parents=True, exist_ok=True)
        subprocess.run(["slurmd", "-N", name], env=env, check=True, timeout=60)
    deadline = time.monotonic() + 60
    while True:  # bounded: the deadline
        state = " ".join(cluster.run("sinfo", "-h", "-N", "-o", "%T").split())
        if (
            state
            and set(state.split()) <= {"idle", "mixed", "allocated"}
            and len(state.split()) == len(names)
        ):
            return cluster
        if time.monotonic() > deadline:
            cluster.stop()
            logs = "".join(f.read_text()[-1500:] for f in sorted((folder / "log").glob("*.log")))
            raise RuntimeError(f"the Slurm node is {state!r} after 60 s:\n{logs}")
        time.sleep(0.3)


if __name__ == "__main__":
    c = start(Path(sys.argv[1]).resolve(), nodes=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(
        f"export SLURM_CONF={c.conf}   # nodes {','.join(c.nodes)}, {c.cpus} CPUs each, partition {PARTITION}"
    )
