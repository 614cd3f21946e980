"""Model references: base models in the model root, the bundled tiny models, and fine-tuned ids.

A base model is a directory directly under the model root holding config.json; its name is the
directory name. Names are checked (no separators, no dot-dot) and the resolved real path must stay
inside the root, so a symlink cannot point a job at an arbitrary directory. The bundled tiny models
(`tiny-<arch>-<size>`) are always offered; the training worker writes them into the root on first
use (building them needs torch, which the API process never imports).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import FineTunedModel
from service.errors import InvalidRequest
from service.schemas import ModelObject

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TINY_RE = re.compile(r"tiny-(opt|gpt2|llama)-(xs|s|m)")
TINY_NAMES = [f"tiny-{a}-{s}" for a in ("opt", "gpt2", "llama") for s in ("xs", "s", "m")]
TINY_PRETRAIN_STEPS = 200


@dataclass
class ModelRef:
    name: str  # as the client wrote it
    path: Path  # where the worker reads it
    base: str  # the base model's name (for fine-tuned ids)
    tiny: bool = False


def resolve(*, session: Session, tenant: str, name: str, models_dir: Path, param: str) -> ModelRef:
    if name.startswith("ft:"):
        ft = session.get(FineTunedModel, name)
        if ft is None or ft.tenant_id != tenant:
            raise InvalidRequest(f"{param}: no fine-tuned model {name}", param=param, code="model_not_found")
        return ModelRef(name=name, path=Path(ft.path), base=name.split(":")[1])
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidRequest(f"{param}: {name!r} is not a model name; use a base model from GET /v1/models",
                             param=param)  # fmt: skip
    root = models_dir.resolve()
    path = (models_dir / name).resolve()
    if TINY_RE.fullmatch(name):
        return ModelRef(name=name, path=root / name, base=name, tiny=True)
    if path.parent != root or not (path / "config.json").is_file():
        raise InvalidRequest(f"{param}: no base model {name!r} (see GET /v1/models)", param=param, code="model_not_found")
    return ModelRef(name=name, path=path, base=name)


def base_models(models_dir: Path) -> list[str]:
    names = set(TINY_NAMES)
    if models_dir.is_dir():
        root = models_dir.resolve()
        for p in models_dir.iterdir():
            if NAME_RE.fullmatch(p.name) and p.resolve().parent == root and (p / "config.json").is_file():
                names.add(p.name)
    return sorted(names)


def list_models(*, session: Session, tenant: str, models_dir: Path) -> list[ModelObject]:
    out = [ModelObject(id=n, created=0, owned_by="system") for n in base_models(models_dir)]
    rows = session.scalars(select(FineTunedModel).where(FineTunedModel.tenant_id == tenant)
                           .order_by(FineTunedModel.created_at)).all()  # fmt: skip
    out += [ModelObject(id=r.id, created=int(r.created_at.timestamp()), owned_by=tenant) for r in rows]
    return out


def fine_tuned_id(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{suffix or ''}:{job_id}"
