"""Reading user files safely: gzip by magic bytes, caps on decompressed size and line length.

A gzip bomb or a single 10 GB line must fail with a clear error, not exhaust memory. Everything
here yields `(line_number, text)` so errors can name the line.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rlhf_engine.data.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class ReadLimits:
    """Caps applied while reading (after decompression)."""

    max_bytes: int = 4 << 30  # 4 GiB of text per file
    max_line_bytes: int = 16 << 20  # 16 MiB per line / record
    max_bad_rows: float = 0.02  # share of a file's rows that may be unusable (skipped, reported)


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _open(path: Path) -> IO[bytes]:
    if is_gzip(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def iter_lines(path: Path, limits: ReadLimits) -> Iterator[tuple[int, str]]:
    """`(line_number, text)` for each line of a text or gzip file (newline stripped)."""
    total = 0
    line_no = 0
    try:
        with _open(path) as f:
            while True:  # bounded: the end of the file (and the size limits)
                raw = f.readline(limits.max_line_bytes + 1)
                if not raw:
                    return
                line_no += 1
                if len(raw) > limits.max_line_bytes and not raw.endswith(b"\n"):
                    raise DataError(
                        f"line is longer than the limit of {limits.max_line_bytes} bytes; split the "
                        "record or raise the line limit",
                        path=str(path),
                        line=line_no,
                    )
                total += len(raw)
                if total > limits.max_bytes:
                    raise DataError(
                        f"file is larger than the limit of {limits.max_bytes} bytes after "
                        "decompression; split it or raise the size limit",
                        path=str(path),
                        line=line_no,
                    )
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"not valid UTF-8 (byte {e.start}); save the file as UTF-8",
                        path=str(path),
                        line=line_no,
                    ) from None
                if line_no == 1:
                    text = text.removeprefix("\ufeff")
                yield line_no, text.rstrip("\r\n")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(
            f"corrupt or truncated gzip ({e}); compress the file again",
            path=str(path),
            line=line_no + 1,
        ) from None


def _read_all(path: Path, limits: ReadLimits) -> str:
    try:
        with _open(path) as f:
            raw = f.read(limits.max_bytes + 1)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"corrupt or truncated gzip ({e}); compress the file again", path=str(path)) from None
    if len(raw) > limits.max_bytes:
        raise DataError(
            f"file is larger than the limit of {limits.max_bytes} bytes after decompression; split it "
            "or raise the size limit",
            path=str(path),
        )
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError("not valid UTF-8; save the file as UTF-8", path=str(path), line=line) from None


def _starts_with_bracket(path: Path) -> bool:
    try:
        with _open(path) as f:
            head = f.read(4096)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        return False  # iter_lines reports the corruption with a line number
    return head.decode("utf-8", "ignore").lstrip("\ufeff \t\r\n").startswith("[")


def iter_json_records(path: Path, limits: ReadLimits) -> Iterator[tuple[int, Any]]:
    """`(line_number, record)` from a JSON Lines file, or from a file holding one JSON array.

    `.json` files written by `datasets.Dataset.to_json` are JSON Lines too, so the shape is decided
    by the first character, not the extension. Array elements are numbered from 1 as "lines"; an
    array is read whole (under the size cap), since `json.dump` writes it on one line.
    """
    if _starts_with_bracket(path):
        try:
            data = json.loads(_read_all(path, limits))
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON: {e.msg} (column {e.colno})", path=str(path), line=e.lineno
            ) from None
        if not isinstance(data, list):
            raise DataError("expected a JSON array of objects or JSON Lines", path=str(path))
        yield from enumerate(data, start=1)
        return
    for no, text in iter_lines(path, limits):
        if not text.strip():
            continue
        try:
            yield no, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object",
                path=str(path),
                line=no,
            ) from None


def iter_paragraphs(path: Path, limits: ReadLimits) -> Iterator[tuple[int, str]]:
    """Documents of a plain-text file: paragraphs separated by blank lines (line = first line)."""
    buf: list[str] = []
    start = 0
    for no, text in iter_lines(path, limits):
        if text.strip():
            if not buf:
                start = no
            buf.append(text)
        elif buf:
            yield start, "\n".join(buf)
            buf = []
    if buf:
        yield start, "\n".join(buf)


def fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes, or of every file under a directory (names and bytes)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
