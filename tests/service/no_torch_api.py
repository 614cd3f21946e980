"""`python -m tests.service.no_torch_api serve …`: the `rlhf` command with torch, transformers and
deepspeed unimportable — the API process must never need them (docs/contracts.md §6). An attempt is
recorded in $RLHF_BLOCKED_LOG as well as raised, so a caught ImportError cannot hide it."""

from __future__ import annotations

import os
import sys
from typing import Any

BLOCKED = ("torch", "transformers", "deepspeed")


class Block:
    """An import hook that refuses torch, transformers and deepspeed (and logs each attempt to
    $RLHF_BLOCKED_LOG when that is set). Also used by tests/service/api_without_torch.py."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in BLOCKED:
            if log := os.environ.get("RLHF_BLOCKED_LOG"):
                with open(log, "a") as f:
                    f.write(f"{name}\n")
            raise ImportError(f"{name} is blocked in the API process")


if __name__ == "__main__":
    sys.meta_path.insert(0, Block())
    from workers.cli import main

    sys.exit(main(sys.argv[1:]))
