"""Streaming an upload to a temporary file under a size cap (files and models share it)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import UploadFile

from service.errors import TooLargeError

CHUNK = 1 << 20


async def save_upload(file: UploadFile, tmp_dir: Path, *, max_bytes: int) -> tuple[Path, int]:
    """(temporary path, size); 413 naming `file` as soon as the stream passes `max_bytes`. The caller
    removes the file."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    size = 0
    with tempfile.NamedTemporaryFile(dir=tmp_dir, delete=False) as out:
        tmp = Path(out.name)
        try:
            while chunk := await file.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise TooLargeError(
                        f"file: larger than this server's limit of {max_bytes} bytes", param="file"
                    )
                out.write(chunk)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return tmp, size
