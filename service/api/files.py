"""/v1/files: multipart upload streamed to disk under a size cap, validated by the data layer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import FileResponse

from service.api.deps import CallerDep, SessionDep, SettingsDep
from service.api.openapi import COMMON, errors
from service.api.uploads import save_upload
from service.errors import InvalidRequestError
from service.schemas import Deleted, FileList, FileObject
from service.services import files as svc

router = APIRouter(prefix="/v1/files", tags=["files"], responses=errors(*COMMON))


@router.post("", response_model=FileObject)
async def upload(
    file: UploadFile,
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    purpose: Annotated[str, Form()] = "fine-tune",
    expires_anchor: Annotated[str | None, Form(alias="expires_after[anchor]")] = None,
    expires_seconds: Annotated[int | None, Form(alias="expires_after[seconds]")] = None,
) -> Any:
    """Purposes: fine-tune (training and validation data, checked as a dataset on upload), evals (the
    same checks), user_data (any file, kept as it is). `expires_after[anchor]=created_at` with
    `expires_after[seconds]` (3600 to 2592000) makes the file expire: then it is no longer found."""
    svc.check_upload(filename=file.filename or "", purpose=purpose)
    if (expires_anchor is None) != (expires_seconds is None) or expires_anchor not in (None, "created_at"):
        raise InvalidRequestError(
            "expires_after: give anchor 'created_at' and seconds (3600 to 2592000) together",
            param="expires_after",
        )
    tmp, size = await save_upload(file, settings.files_dir / ".uploads", max_bytes=settings.max_file_bytes)
    if size == 0:
        tmp.unlink(missing_ok=True)
        raise InvalidRequestError("file: the upload is empty", param="file")
    try:
        f = svc.register_file(
            session=session,
            tenant=caller.tenant_id,
            filename=file.filename or "upload",
            purpose=purpose,
            upload=tmp,
            size=size,
            files_dir=settings.files_dir,
            max_bytes=settings.max_file_bytes,
            expires_after_s=expires_seconds,
        )
    finally:
        tmp.unlink(missing_ok=True)
    session.commit()
    return svc.to_object(f)


@router.get("", response_model=FileList, responses=errors(404))
def list_files(
    caller: CallerDep,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="page size")] = 10_000,
    purpose: Annotated[str | None, Query(description="only files of this purpose")] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="by creation: desc (newest first)")] = "desc",
) -> Any:
    return svc.list_files(
        session=session, tenant=caller.tenant_id, after=after, limit=limit, purpose=purpose, order=order
    )


@router.get("/{file_id}", response_model=FileObject, responses=errors(404))
def get_file(file_id: str, caller: CallerDep, session: SessionDep) -> Any:
    return svc.to_object(svc.get_file(session=session, tenant=caller.tenant_id, file_id=file_id))


@router.get("/{file_id}/content", responses=errors(404), response_class=FileResponse)
def file_content(file_id: str, caller: CallerDep, session: SessionDep) -> Any:
    """The file's bytes as stored (the SDK's `files.content(id)`): yours only."""
    f = svc.get_file(session=session, tenant=caller.tenant_id, file_id=file_id)
    media = "text/csv" if f.purpose == svc.RESULTS else "application/octet-stream"
    return FileResponse(f.path, media_type=media, filename=f.filename)


@router.delete("/{file_id}", response_model=Deleted, responses=errors(404))
def delete_file(file_id: str, caller: CallerDep, session: SessionDep) -> Any:
    f = svc.delete_file(session=session, tenant=caller.tenant_id, file_id=file_id)
    session.commit()
    return Deleted(id=f.id, object="file")
