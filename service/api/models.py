"""/v1/models: base models and the caller's fine-tuned models (OpenAI model objects)."""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Form, Query, UploadFile
from fastapi.responses import FileResponse

from service.api.deps import CallerDep, SessionDep, SettingsDep
from service.api.openapi import COMMON, errors
from service.api.uploads import save_upload
from service.schemas import Deleted, ModelList, ModelObject
from service.services import chat as chat_svc
from service.services import models as svc

router = APIRouter(prefix="/v1/models", tags=["models"], responses=errors(*COMMON))


@router.get("", response_model=ModelList, responses=errors(404))
def list_models(
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 1000,
) -> Any:
    return svc.list_page(
        session=session, tenant=caller.tenant_id, models_dir=settings.models_dir, after=after, limit=limit
    )


@router.post("", response_model=ModelObject, responses=errors(409))
async def upload_model(
    file: UploadFile,
    name: Annotated[str, Form()],
    caller: CallerDep,
    session: SessionDep,
    settings: SettingsDep,
    base: Annotated[
        str | None,
        Form(
            description="for a LoRA adapter: the model it applies to (default: its base_model_name_or_path)"
        ),
    ] = None,
) -> Any:
    """A Hugging Face model directory as a .tar/.tar.gz (safetensors only) becomes one of your base models;
    a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) becomes an adapter model,
    served on its base (checked against it: layers, ranks, tokenizer)."""
    tmp, _ = await save_upload(
        file, settings.data_dir / "uploads" / ".incoming", max_bytes=settings.max_model_bytes
    )
    try:
        row = await asyncio.to_thread(
            svc.upload_model,
            session=session,
            tenant=caller.tenant_id,
            name=name,
            archive=tmp,
            models_dir=settings.models_dir,
            uploads_dir=settings.data_dir / "uploads",
            max_bytes=settings.max_model_bytes,
            base=base,
        )
    finally:
        tmp.unlink(missing_ok=True)
    session.commit()
    return ModelObject(
        id=row.name, created=int(row.created_at.timestamp()), owned_by=caller.tenant_id, parent=row.base
    )


@router.get("/{model_id:path}/content", responses=errors(404))
def download_model(
    model_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep, background: BackgroundTasks
) -> Any:
    """Your fine-tuned (or uploaded) model's directory as a .tar.gz."""
    path = svc.model_path(session=session, tenant=caller.tenant_id, model_id=model_id)
    tmp_dir = settings.data_dir / "uploads" / ".outgoing"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir, suffix=".tar.gz")
    os.close(fd)
    svc.archive_model(path, Path(name))
    background.add_task(os.unlink, name)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_id)
    return FileResponse(name, media_type="application/gzip", filename=f"{safe}.tar.gz")


@router.get("/{model_id:path}", response_model=ModelObject, responses=errors(404))
def get_model(model_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> Any:
    return svc.get_model(
        session=session, tenant=caller.tenant_id, models_dir=settings.models_dir, model_id=model_id
    )


@router.delete("/{model_id:path}", response_model=Deleted, responses=errors(404))
def delete_model(model_id: str, caller: CallerDep, session: SessionDep) -> Any:
    """Delete your fine-tuned (or uploaded) model and its weights (refused while a live job uses it)."""
    svc.delete_model(session=session, tenant=caller.tenant_id, model_id=model_id)
    session.commit()
    chat_svc.forget(model_id)
    return Deleted(id=model_id, object="model")
