"""Uploaded data files: stored under the data directory, validated by the data layer on upload."""

from __future__ import annotations

import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Literal, cast

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service.db.models import File, Job, new_id, utcnow
from service.errors import InvalidRequestError, NotFoundError, WrongStateError
from service.jobs.states import ACTIVE
from service.pagination import newest_first, paged
from service.schemas import FileList, FileObject, FilePurpose

SUFFIXES = (".jsonl", ".json", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz")
# what a client may upload: training data (checked as a dataset), eval data (checked likewise) and
# user_data (kept as it is: any bytes); `fine-tune-results` files are written by the service only
UPLOAD_PURPOSES = ("fine-tune", "evals", "user_data")
RESULTS = "fine-tune-results"
CHECKED = ("fine-tune",)  # purposes whose files the data layer reads and checks on upload
# evals files: OpenAI's eval rows, one JSON object per line ({item, sample?} or the item's own fields)
EXPIRY_S = (3600, 2_592_000)  # OpenAI's bounds of expires_after.seconds: 1 hour to 30 days
CHARS_PER_TOKEN = 4  # for estimates before tokenisation


def check_upload(*, filename: str, purpose: str) -> str:
    """The stored suffix of an upload, or a 400 naming the field."""
    if purpose not in UPLOAD_PURPOSES:
        also = " (written by the service for a job's results)" if purpose == RESULTS else ""
        raise InvalidRequestError(
            f"purpose: {purpose!r} cannot be uploaded here{also}; use one of {', '.join(UPLOAD_PURPOSES)}",
            param="purpose",
        )
    if purpose not in CHECKED:
        return Path(re.sub(r"[^A-Za-z0-9._-]", "_", filename)).suffix[:16] or ".bin"
    name = filename.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise InvalidRequestError(f"file: {filename!r} must end in one of {', '.join(SUFFIXES)}", param="file")


def register_file(
    *,
    session: Session,
    tenant: str,
    filename: str,
    purpose: str,
    upload: Path,
    size: int,
    files_dir: Path,
    max_bytes: int,
    expires_after_s: int | None = None,
) -> File:
    """Validate an uploaded temporary file with the data layer and keep it. Bad data → 400 with the
    reader's message (which names the line). `user_data` files are kept as they are."""
    suffix = check_upload(filename=filename, purpose=purpose)
    if expires_after_s is not None and not EXPIRY_S[0] <= expires_after_s <= EXPIRY_S[1]:
        raise InvalidRequestError(
            f"expires_after.seconds: {expires_after_s} must be between {EXPIRY_S[0]} (1 hour) and "
            f"{EXPIRY_S[1]} (30 days)",
            param="expires_after.seconds",
        )
    file_id = new_id("file")
    dest = _place(files_dir, tenant, f"{file_id}{suffix}")
    os.replace(upload, dest)
    if purpose in CHECKED:
        f = _checked(dest, file_id, filename, max_bytes)
    elif purpose == "evals":
        f = _eval_rows(dest, file_id, filename)
    else:
        f = File(id=file_id, format="raw", kind="none", rows=0, tokens_estimate=0, skipped={})
    f.tenant_id, f.purpose, f.bytes, f.path = tenant, purpose, size, str(dest)
    f.filename = re.sub(r"[\x00-\x1f/\\]", "_", filename)[:255]
    if expires_after_s is not None:
        f.expires_at = utcnow() + timedelta(seconds=expires_after_s)
    session.add(f)
    session.flush()
    return f


def _place(files_dir: Path, tenant: str, name: str) -> Path:
    """Where a file of `tenant` is kept (its folder made)."""
    (files_dir / tenant).mkdir(parents=True, exist_ok=True)
    return files_dir / tenant / name


def _eval_rows(dest: Path, file_id: str, filename: str) -> File:
    """An evals file: JSONL whose every line is an object (a 400 naming the line otherwise)."""
    rows = 0
    with open(dest, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                ok = isinstance(json.loads(line), dict)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                dest.unlink(missing_ok=True)
                raise InvalidRequestError(
                    f"file: {filename}, line {n}: an evals file holds one JSON object per line ({{item, "
                    "sample?}} or the item's fields)",
                    param="file",
                    code="invalid_file",
                )
            rows += 1
    if not rows:
        dest.unlink(missing_ok=True)
        raise InvalidRequestError(f"file: {filename} has no rows", param="file", code="invalid_file")
    return File(id=file_id, format="jsonl", kind="eval_rows", rows=rows, tokens_estimate=0, skipped={})


def _checked(dest: Path, file_id: str, filename: str, max_bytes: int) -> File:
    """A data file read by the data layer (the file is removed and a 400 raised when it is bad)."""
    from rlhf_engine.data.errors import DataError
    from rlhf_engine.data.io import ReadLimits
    from rlhf_engine.data.readers import read_dataset

    try:
        ds = read_dataset(str(dest), ReadLimits(max_bytes=max_bytes))
    except DataError as e:
        dest.unlink(missing_ok=True)
        raise InvalidRequestError(
            f"file: {str(e).replace(str(dest), filename)}", param="file", code="invalid_file"
        ) from None
    rows = len(ds)
    chars = (
        sum(len(t) for t in ds.texts or [])
        if ds.kind == "text"
        else sum(len(s.prompt_text) + len(s.chosen or "") for s in ds.rows)
    )
    return File(
        id=file_id,
        format=ds.format,
        kind=ds.kind,
        rows=rows,
        tokens_estimate=chars // CHARS_PER_TOKEN,
        skipped=dict(ds.filtered),
    )


def register_results(
    *, session: Session, tenant: str, filename: str, content: bytes, files_dir: Path, rows: int
) -> File:
    """A file the service writes for the tenant (a job's results CSV: purpose fine-tune-results)."""
    file_id = new_id("file")
    dest = _place(files_dir, tenant, f"{file_id}.csv")
    tmp = dest.with_suffix(".csv.tmp")
    tmp.write_bytes(content)
    os.replace(tmp, dest)
    f = File(
        id=file_id,
        tenant_id=tenant,
        filename=filename,
        purpose=RESULTS,
        bytes=len(content),
        path=str(dest),
        format="csv",
        kind="results",
        rows=rows,
        tokens_estimate=0,
        skipped={},
    )
    session.add(f)
    session.flush()
    return f


def _expired(f: File) -> bool:
    return f.expires_at is not None and f.expires_at <= utcnow()


def get_file(*, session: Session, tenant: str, file_id: str, param: str = "file_id") -> File:
    f = session.get(File, file_id)
    if f is None or f.tenant_id != tenant or f.deleted or _expired(f):
        raise NotFoundError(f"{param}: no file {file_id}", param=param)
    return f


def list_files(
    *,
    session: Session,
    tenant: str,
    after: str | None = None,
    limit: int = 100,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """The tenant's files, newest first (`order=asc`: oldest first), of one `purpose` when given."""
    live = or_(File.expires_at.is_(None), File.expires_at > utcnow())
    q = select(File).where(File.tenant_id == tenant, File.deleted.is_(False), live)
    if purpose is not None:
        q = q.where(File.purpose == purpose)
    rows, more = newest_first(
        session,
        q,
        File,
        after=after,
        find=lambda file_id: get_file(session=session, tenant=tenant, file_id=file_id),
        what="file",
        limit=limit,
        oldest_first=order == "asc",
    )
    return paged(FileList, [to_object(f) for f in rows], more)


def purge_expired(*, session: Session) -> int:
    """Delete the files whose `expires_after` has passed (not found since then), bytes and all; a file a
    live job still reads waits until the job ends. Returns how many went (the sweeper calls this)."""
    expired = session.scalars(
        select(File).where(File.deleted.is_(False), File.expires_at.is_not(None), File.expires_at <= utcnow())
    ).all()
    if not expired:
        return 0
    live = {i for j in session.scalars(select(Job).where(Job.status.in_(ACTIVE))) for i in j.file_ids or []}
    gone = [f for f in expired if f.id not in live]
    for f in gone:
        f.deleted = True
        Path(f.path).unlink(missing_ok=True)
    return len(gone)


def delete_file(*, session: Session, tenant: str, file_id: str) -> File:
    f = get_file(session=session, tenant=tenant, file_id=file_id)
    jobs = session.scalars(select(Job).where(Job.tenant_id == tenant, Job.status.in_(ACTIVE))).all()
    users = [j.id for j in jobs if file_id in (j.file_ids or [])]
    if users:
        raise WrongStateError(
            f"file {file_id} is used by the live job {users[0]}; cancel it or wait for it to end",
            param="file_id",
        )
    f.deleted = True
    Path(f.path).unlink(missing_ok=True)
    return f


def to_object(f: File) -> FileObject:
    return FileObject(
        id=f.id,
        bytes=f.bytes,
        created_at=int(f.created_at.timestamp()),
        expires_at=int(f.expires_at.timestamp()) if f.expires_at else None,
        filename=f.filename,
        purpose=cast(FilePurpose, f.purpose),
        format=f.format,
        kind=f.kind,
        rows=f.rows,
        skipped=f.skipped or {},
    )
