"""Two "nodes" on this machine the way DeepSpeed-Chat's multi-node runs reach theirs: host names in a
hostfile, ssh with a key, pdsh (DeepSpeed's runner) or OpenMPI's mpirun (Kubeflow Trainer's DeepSpeed
runtime) fanning the launch out (Debian's openssh-server, pdsh, openmpi-bin; `make slurm` installs them).

    nodes = start(folder)      # an sshd on a free loopback port, a key made here, two host names for it
    nodes.hostfile             # "rlhf-node-a slots=1" / "rlhf-node-b slots=1"
    nodes.stop()               # the sshd ended, the host names' ssh configuration removed

The host names exist for ssh only: `/etc/ssh/ssh_config.d/rlhf-test-nodes.conf` points them at this
sshd (127.0.0.1, its port, the key, no known-hosts file), so DeepSpeed's own ssh check, its `hostname -I`
for the master address, pdsh's and mpirun's ssh all reach this machine, and nothing else on it changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers.slurm import free_port

NAMES = ("rlhf-node-a", "rlhf-node-b")
SSH_CONFIG = Path("/etc/ssh/ssh_config.d/rlhf-test-nodes.conf")


@dataclasses.dataclass
class Nodes:
    folder: Path
    port: int
    hostfile: Path
    names: tuple[str, ...]

    def ssh(self, name: str, command: str) -> str:
        done = subprocess.run(
            ["ssh", "-o", "BatchMode=yes", name, command],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return done.stdout + done.stderr

    def stop(self) -> None:
        SSH_CONFIG.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((self.folder / "sshd.pid").read_text().strip()), signal.SIGTERM)


def missing() -> list[str]:
    return [p for p in ("ssh", "ssh-keygen", "pdsh") if shutil.which(p) is None] + (
        [] if Path("/usr/sbin/sshd").is_file() else ["sshd"]
    )


def start(folder: Path) -> Nodes:
    gone = missing()
    if gone:
        raise RuntimeError(f"{', '.join(gone)} missing: run `make slurm` (openssh-server, pdsh)")
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        (folder / key).unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True, timeout=30
        )
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    port = free_port()
    (folder / "sshd_config").write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {folder / 'host_key'}",
                f"AuthorizedKeysFile {folder / 'authorized_keys'}",
                f"PidFile {folder / 'sshd.pid'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AcceptEnv LANG LC_*",
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    subprocess.run(["/usr/sbin/sshd", "-f", str(folder / "sshd_config")], check=True, timeout=30)
    SSH_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    SSH_CONFIG.write_text(
        "\n".join(
            [
                f"Host {' '.join(NAMES)}",
                "  HostName 127.0.0.1",
                f"  Port {port}",
                f"  IdentityFile {folder / 'client_key'}",
                "  IdentitiesOnly yes",
                "  StrictHostKeyChecking no",
                "  UserKnownHostsFile /dev/null",
                "  LogLevel ERROR",
                "",
            ]
        )
    )
    hostfile = folder / "hostfile"
    hostfile.write_text("".join(f"{n} slots=1\n" for n in NAMES))
    nodes = Nodes(folder=folder, port=port, hostfile=hostfile, names=NAMES)
    deadline = time.monotonic() + 30
    while nodes.ssh(NAMES[0], "echo ok").strip() != "ok":  # bounded: the deadline
        if time.monotonic() > deadline:
            nodes.stop()
            raise RuntimeError(f"ssh to {NAMES[0]} does not answer: {nodes.ssh(NAMES[0], 'echo ok')}")
        time.sleep(0.3)
    return nodes
