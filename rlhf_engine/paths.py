"""Where the engine keeps what it builds once and reuses: bundled data, tiny models, tokenised data.

One environment variable, `RLHF_CACHE_DIR`, moves all of it (the Makefile points it into the
checkout so a build is paid once per machine, not once per test).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache root (`$RLHF_CACHE_DIR`, default `~/.cache/rlhf`) or a sub-folder of it, created."""
    root = Path(os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
