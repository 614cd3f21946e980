"""torch.distributed set-up for one process or many (DeepSpeed launcher / torchrun), CPU or CUDA.

Single process without a launcher: DeepSpeed still wants the rendezvous variables (otherwise it
tries MPI discovery and fails with "No module named 'mpi4py'"), so they are filled in.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:N"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on loopback (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> Dist:
    """Join (or create) the process group: NCCL on CUDA, gloo on CPU. Idempotent."""
    import torch

    from rlhf_engine.runtime.ops import load_ops, needed

    cuda = torch.cuda.is_available()
    if not dist_initialized():
        # the collectives' op, built or loaded under the build lock before DeepSpeed asks for it inside the
        # rendezvous (a build there would hold the lock while the other ranks wait for it)
        load_ops(needed(offload=False))
    if "RANK" not in os.environ:
        os.environ.update(
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port()),
            }
        )
    import deepspeed
    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury our progress
    # torch 2.13 deprecates the collectives DeepSpeed calls, once per call: noise, not news
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, f"cuda:{local_rank}" if cuda else "cpu")


def dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def finish(ok: bool, world_size: int, *, code: int | None = None) -> None:
    """End a worker process of a multi-process run.

    Two-process gloo runs abort at interpreter exit in ~20% of runs *after* finishing correctly
    ("terminate called without an active exception"); tearing the group down, flushing and leaving
    with os._exit avoids it (docs/cpu.md). Success is decided by the step's summary.json anyway.
    """
    if world_size <= 1:
        return
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code if code is not None else (0 if ok else 1))
