"""/v1/models: base models and the caller's fine-tuned models (OpenAI model objects)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.deps import CallerDep, SessionDep, SettingsDep
from service.errors import NotFound
from service.schemas import ModelList, ModelObject
from service.services import models as svc

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(caller: CallerDep, session: SessionDep, settings: SettingsDep) -> Any:
    return ModelList(data=svc.list_models(session=session, tenant=caller.tenant_id, models_dir=settings.models_dir))


@router.get("/{model_id:path}", response_model=ModelObject)
def get_model(model_id: str, caller: CallerDep, session: SessionDep, settings: SettingsDep) -> Any:
    for m in svc.list_models(session=session, tenant=caller.tenant_id, models_dir=settings.models_dir):
        if m.id == model_id:
            return m
    raise NotFound(f"no model {model_id}", param="model")
