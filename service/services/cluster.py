"""What the cluster behind a Slurm-backed server offers, asked before a job is stored: the partition
its steps go to exists, and has at least the nodes a job asks for (`sinfo`, bounded, cached a minute).

Where the API's machine has no Slurm client (`sinfo` not installed, or the controller unreachable) the
check is skipped, and a job the cluster cannot take fails at submission with the scheduler's own
message (workers/launchers.py) — never a hang.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import threading
import time

from service.errors import InvalidRequestError
from service.settings import Settings

logger = logging.getLogger(__name__)
CACHE_S = 60.0
USABLE = {"idle", "mix", "alloc", "comp", "resv", "plnd"}  # node states that can run a job
SINFO_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Partitions:
    nodes: dict[str, int]  # partition → its node count
    default: str | None


_cache: dict[str, tuple[float, Partitions | None]] = {}
_lock = threading.Lock()


def forget() -> None:
    """Ask the cluster again on the next check (the cached answer dropped)."""
    with _lock:
        _cache.clear()


def partitions() -> Partitions | None:
    """The cluster's partitions and node counts, or None when Slurm cannot be asked from here."""
    with _lock:
        hit = _cache.get("sinfo")
        if hit and time.monotonic() - hit[0] < CACHE_S:
            return hit[1]
    found: Partitions | None = None
    try:
        done = subprocess.run(  # one line per partition and node state
            ["sinfo", "-h", "-o", "%P|%D|%t"], capture_output=True, text=True, timeout=SINFO_TIMEOUT_S
        )
        if done.returncode == 0:
            nodes: dict[str, int] = {}
            default = None
            for line in done.stdout.splitlines():
                name, count, state = (line.strip().split("|") + ["", ""])[:3]
                if not name:
                    continue
                if name.endswith("*"):  # sinfo marks the default partition
                    name = name[:-1]
                    default = name
                usable = state.rstrip("*~#!%$@^-") in USABLE  # not down, drained, failing
                nodes[name] = nodes.get(name, 0) + (int(count or 0) if usable else 0)
            found = Partitions(nodes, default)
        else:
            logger.warning("sinfo failed (%s); jobs are not checked against the cluster", done.stderr.strip())
    except (FileNotFoundError, subprocess.TimeoutExpired, ValueError) as e:
        logger.warning("cannot ask Slurm (%s); jobs are not checked against the cluster", e)
    with _lock:
        _cache["sinfo"] = (time.monotonic(), found)
    return found


def check_nodes(nodes: int, settings: Settings) -> None:
    """400 naming `nodes` when this server's partition is missing or smaller than the job."""
    if settings.launch_backend != "slurm":
        return
    found = partitions()
    if found is None:
        return
    name = settings.slurm_partition or found.default
    if name is None or name not in found.nodes:
        raise InvalidRequestError(
            f"nodes: this server's Slurm partition {settings.slurm_partition or '(the default)'!r} "
            "(RLHF_SLURM_PARTITION) does "
            f"not exist on the cluster (it has {', '.join(sorted(found.nodes)) or 'none'}); nothing was "
            "submitted — the operator must set an existing one",
            param="nodes",
        )
    if nodes > found.nodes[name]:
        raise InvalidRequestError(
            f"nodes: {nodes} is more than the {found.nodes[name]} usable node(s) of Slurm partition "
            f"{name!r}; ask for at most {found.nodes[name]}",
            param="nodes",
        )
