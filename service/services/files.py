"""Uploaded data files: stored under the data directory, validated by the data layer on upload."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import File, Job, new_id
from service.errors import ConflictError, InvalidRequestError, NotFoundError
from service.jobs.states import ACTIVE
from service.pagination import newest_first, paged
from service.schemas import FileList, FileObject

SUFFIXES = (".jsonl", ".json", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz")
PURPOSES = ("fine-tune",)
CHARS_PER_TOKEN = 4  # for estimates before tokenisation


def check_upload(*, filename: str, purpose: str) -> str:
    """The stored suffix of an upload, or a 400 naming the field."""
    if purpose not in PURPOSES:
        raise InvalidRequestError(f"purpose: {purpose!r} is not supported; use 'fine-tune'", param="purpose")
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
) -> File:
    """Validate an uploaded temporary file with the data layer and keep it. Bad data → 400 with the
    reader's message (which names the line)."""
    from rlhf_engine.data.errors import DataError
    from rlhf_engine.data.io import ReadLimits
    from rlhf_engine.data.readers import read_dataset

    suffix = check_upload(filename=filename, purpose=purpose)
    file_id = new_id("file")
    dest_dir = files_dir / tenant
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{file_id}{suffix}"
    os.replace(upload, dest)
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
    f = File(
        id=file_id,
        tenant_id=tenant,
        filename=re.sub(r"[\x00-\x1f/\\]", "_", filename)[:255],
        purpose=purpose,
        bytes=size,
        path=str(dest),
        format=ds.format,
        kind=ds.kind,
        rows=rows,
        tokens_estimate=chars // CHARS_PER_TOKEN,
        skipped=dict(ds.filtered),
    )
    session.add(f)
    session.flush()
    return f


def get_file(*, session: Session, tenant: str, file_id: str, param: str = "file_id") -> File:
    f = session.get(File, file_id)
    if f is None or f.tenant_id != tenant or f.deleted:
        raise NotFoundError(f"{param}: no file {file_id}", param=param)
    return f


def list_files(*, session: Session, tenant: str, after: str | None = None, limit: int = 100) -> FileList:
    """The tenant's files, newest first."""
    q = select(File).where(File.tenant_id == tenant, File.deleted.is_(False))
    rows, more = newest_first(
        session,
        q,
        File,
        after=after,
        find=lambda file_id: get_file(session=session, tenant=tenant, file_id=file_id),
        what="file",
        limit=limit,
    )
    return paged(FileList, [to_object(f) for f in rows], more)


def delete_file(*, session: Session, tenant: str, file_id: str) -> File:
    f = get_file(session=session, tenant=tenant, file_id=file_id)
    jobs = session.scalars(select(Job).where(Job.tenant_id == tenant, Job.status.in_(ACTIVE))).all()
    users = [j.id for j in jobs if file_id in (j.file_ids or [])]
    if users:
        raise ConflictError(
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
        filename=f.filename,
        purpose=f.purpose,
        format=f.format,
        kind=f.kind,
        rows=f.rows,
        skipped=f.skipped or {},
    )
