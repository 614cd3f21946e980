"""Model references: base models in the model root, the bundled tiny models, and fine-tuned ids.

A base model is a directory directly under the model root holding config.json; its name is the
directory name. Names are checked (no separators, no dot-dot) and the resolved real path must stay
inside the root, so a symlink cannot point a job at an arbitrary directory. The bundled tiny models
(`tiny-<arch>-<size>`) are always offered; the training worker writes them into the root on first
use (building them needs torch, which the API process never imports).
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf_engine.models import tiny
from rlhf_engine.models.adapter import (
    ADAPTER_DIR,
    CONFIG,
    AdapterError,
    check_adapter,
    is_adapter,
    read_config,
)
from service.db.models import FineTunedModel, Job, UploadedModel
from service.errors import ConflictError, InvalidRequestError, NotFoundError, WrongStateError
from service.jobs.states import ACTIVE
from service.pagination import cut, paged
from service.schemas import ModelList, ModelObject
from service.services import checkpoints

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TINY_RE = re.compile(rf"tiny-({'|'.join(tiny.ARCHS)})-({'|'.join(tiny.SIZES_ORDER)})")
TINY_NAMES = [f"tiny-{a}-{s}" for a in tiny.ARCHS for s in tiny.SIZES_ORDER]
TINY_PRETRAIN_STEPS = 200
# the real checkpoint the kit builds offline, and a small reward model on its tokenizer (a reward
# model must read the actor's token ids): `rlhf demo --model smollm2` trains with the two
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_RM = "smollm2-rm-xs"
BUNDLED_NAMES = [*TINY_NAMES, SMOLLM2, SMOLLM2_RM]


def is_bundled(name: str) -> bool:
    """A model the server builds into its model root on first use (no upload can take these names)."""
    return bool(TINY_RE.fullmatch(name)) or name in (SMOLLM2, SMOLLM2_RM)


def build_args(name: str) -> list[str]:
    """The `rlhf` arguments that build bundled model `name` (into the folder given with --out)."""
    if m := TINY_RE.fullmatch(name):
        return [
            "models",
            "tiny",
            "--arch",
            m.group(1),
            "--size",
            m.group(2),
            "--pretrain-steps",
            str(TINY_PRETRAIN_STEPS),
            "--sample",
            "",
        ]
    if name == SMOLLM2:
        return ["models", "smollm2"]
    if name == SMOLLM2_RM:
        return [
            "models",
            "tiny",
            "--arch",
            "llama",
            "--size",
            "xs",
            "--tokenizer",
            "smollm2",
            "--pretrain-steps",
            str(TINY_PRETRAIN_STEPS),
            "--sample",
            "",
        ]
    raise ValueError(f"{name} is not a bundled model")


@dataclass
class ModelRef:
    name: str  # as the client wrote it
    path: Path  # where the worker reads it (a whole model; an uploaded adapter's PEFT folder)
    base: str  # the base model's name (for fine-tuned ids)
    tiny: bool = False
    key: str = ""  # unique across tenants (uploaded names are only unique per tenant): how workers cache it
    # a LoRA adapter: its PEFT folder and the whole model it is served on (one copy for all its adapters)
    adapter: Path | None = None
    parent: ModelRef | None = None

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    @property
    def whole(self) -> bool:
        """A model folder training can start from (an uploaded adapter is only served)."""
        return self.adapter != self.path and ((self.path / "config.json").is_file() or self.tiny)


def resolve(
    *, session: Session, tenant: str, name: str, models_dir: Path, param: str, max_bytes: int | None = None
) -> ModelRef:
    """The model `name` as the caller may use it; one whose weights are over `max_bytes` (the operator's
    RLHF_MAX_MODEL_BYTES) is refused here, before a worker loads anything."""
    ref = _resolve(session=session, tenant=tenant, name=name, models_dir=models_dir, param=param)
    weights = ref.parent if ref.parent is not None else ref  # an adapter's memory is its base's
    if max_bytes is not None and not weights.tiny:
        size = (
            sum(f.stat().st_size for f in weights.path.glob("*.safetensors")) if weights.path.is_dir() else 0
        )
        if size > max_bytes:
            raise InvalidRequestError(
                f"{param}: {name} has {size / 2**30:.2f} GiB of weights, over this server's limit of "
                f"{max_bytes / 2**30:.2f} GiB (RLHF_MAX_MODEL_BYTES); choose a smaller model, or ask "
                "the operator to raise the limit",
                param=param,
                code="model_too_large",
            )
    return ref


def _resolve(*, session: Session, tenant: str, name: str, models_dir: Path, param: str) -> ModelRef:
    if name.startswith("ft:") and checkpoints.is_checkpoint(name):  # one of a job's checkpoints (or shared)
        path = checkpoints.model_folder(session, tenant, name, param)
        ref = ModelRef(name=name, path=path, base=name.split(":")[1])
        return _with_adapter(session, ref, checkpoints.job_of(session, name), models_dir)
    if name.startswith("ft:"):
        ft = session.get(FineTunedModel, name)
        if ft is None or ft.tenant_id != tenant:
            raise InvalidRequestError(
                f"{param}: no fine-tuned model {name}", param=param, code="model_not_found"
            )
        path = Path(ft.path)
        # a job whose model was replaced by one of its checkpoints (POST …/promote): workers cache it
        # under a key of its own, so none keeps serving the weights it held before
        key = (
            f"{name}@{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
            if "checkpoints" in path.parts
            else ""
        )
        ref = ModelRef(name=name, path=path, base=name.split(":")[1], key=key)
        return _with_adapter(session, ref, session.get(Job, ft.job_id), models_dir)
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidRequestError(
            f"{param}: {name!r} is not a model name; use a base model from GET /v1/models", param=param
        )
    if is_bundled(name):  # bundled (an upload cannot take these names): no database needed
        return ModelRef(name=name, path=models_dir.resolve() / name, base=name, tiny=True)
    own = session.scalar(
        select(UploadedModel).where(UploadedModel.tenant_id == tenant, UploadedModel.name == name)
    )
    if own is not None:
        ref = ModelRef(name=name, path=Path(own.path), base=own.base or name, key=f"upload:{own.id}")
        if own.base is not None:  # an uploaded adapter: served on the base it was checked against
            ref.adapter = ref.path
            ref.parent = _resolve(
                session=session, tenant=tenant, name=own.base, models_dir=models_dir, param=param
            )
        return ref
    root = models_dir.resolve()
    path = (models_dir / name).resolve()
    if path.parent != root or not (path / "config.json").is_file():
        raise InvalidRequestError(
            f"{param}: no base model {name!r} (see GET /v1/models)", param=param, code="model_not_found"
        )
    return ModelRef(name=name, path=path, base=name)


def _with_adapter(session: Session, ref: ModelRef, job: Job | None, models_dir: Path) -> ModelRef:
    """A fine-tuned model whose folder also holds the LoRA adapter of a frozen base (adapter/, written
    by a LoRA step with only_optimize_lora) is served as that adapter on the job's own base model — the
    base its adapter names. Anything else (the base gone, another base: a step that started from step 1's
    model) is served whole, from the merged weights beside it."""
    folder = ref.path / ADAPTER_DIR
    if job is None or not is_adapter(folder):
        return ref
    try:
        named = read_config(folder).get("base_model_name_or_path")
        parent = _resolve(
            session=session, tenant=job.tenant_id, name=job.model, models_dir=models_dir, param="model"
        )
    except (AdapterError, InvalidRequestError, NotFoundError):
        return ref
    if parent.parent is not None or not named or Path(str(named)).resolve() != parent.path.resolve():
        return ref
    if not _fits(folder, parent.path, _mtime(folder / CONFIG), _mtime(parent.path)):
        return ref  # one the workers would refuse (an adapted LM head, …) is served whole
    ref.adapter, ref.parent = folder, parent
    return ref


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


@functools.lru_cache(maxsize=1024)
def _fits(folder: Path, base: Path, *_changed: float) -> bool:
    """`check_adapter` once per adapter and base (a listing asks for every fine-tuned model; the headers
    are read again only when either folder changed)."""
    try:
        check_adapter(folder, base)
    except AdapterError:
        return False
    return True


def parent_of(session: Session, tenant: str, model_id: str, models_dir: Path) -> str | None:
    """The model a LoRA adapter model is served on (OpenAI-style listings' `parent`); None for a whole
    model."""
    try:
        ref = _resolve(session=session, tenant=tenant, name=model_id, models_dir=models_dir, param="model")
    except (InvalidRequestError, NotFoundError):
        return None
    return ref.parent.name if ref.parent is not None else None


def bundled_ready(models_dir: Path, name: str) -> bool:
    """A bundled model is built into the model root on first use; until then it is not ready."""
    return (models_dir / name / "config.json").is_file()


def base_models(models_dir: Path) -> list[str]:
    names = set(BUNDLED_NAMES)
    if models_dir.is_dir():
        root = models_dir.resolve()
        for p in models_dir.iterdir():
            if NAME_RE.fullmatch(p.name) and p.resolve().parent == root and (p / "config.json").is_file():
                names.add(p.name)
    return sorted(names)


def list_models(*, session: Session, tenant: str, models_dir: Path) -> list[ModelObject]:
    out = [
        ModelObject(
            id=n, created=0, owned_by="system", ready=bundled_ready(models_dir, n) if is_bundled(n) else True
        )
        for n in base_models(models_dir)
    ]
    rows = session.scalars(
        select(FineTunedModel).where(FineTunedModel.tenant_id == tenant).order_by(FineTunedModel.created_at)
    ).all()
    out += [
        ModelObject(
            id=r.id,
            created=int(r.created_at.timestamp()),
            owned_by=tenant,
            parent=parent_of(session, tenant, r.id, models_dir)
            if is_adapter(Path(r.path) / ADAPTER_DIR)
            else None,
        )
        for r in rows
    ]
    uploads = session.scalars(
        select(UploadedModel).where(UploadedModel.tenant_id == tenant).order_by(UploadedModel.created_at)
    ).all()
    out += [
        ModelObject(id=u.name, created=int(u.created_at.timestamp()), owned_by=tenant, parent=u.base)
        for u in uploads
    ]
    shared = checkpoints.shared_models(session, tenant)
    visible = {m.id for m in out}
    for m in shared:  # a shared LoRA checkpoint is served on its owner's base: named when the caller sees it
        parent = parent_of(session, tenant, m.id, models_dir)
        m.parent = parent if parent in visible else None
    return out + shared


def list_page(*, session: Session, tenant: str, models_dir: Path, after: str | None, limit: int) -> ModelList:
    """A page of `list_models` (base models first, then the tenant's own, oldest first)."""
    rows, more = cut(
        list_models(session=session, tenant=tenant, models_dir=models_dir),
        after=after,
        limit=limit,
        id_of=lambda m: m.id,
        what="model",
    )
    return paged(ModelList, rows, more)


def get_model(*, session: Session, tenant: str, models_dir: Path, model_id: str) -> ModelObject:
    """One model the caller can use (base or their own); another tenant's is not found."""
    for m in list_models(session=session, tenant=tenant, models_dir=models_dir):
        if m.id == model_id:
            return m
    raise NotFoundError(f"no model {model_id}", param="model")


def model_path(*, session: Session, tenant: str, model_id: str) -> Path:
    """The directory of one of the tenant's own models (fine-tuned or uploaded), for download."""
    if model_id.startswith("ft:"):
        ft = session.get(FineTunedModel, model_id)
        if ft is not None and ft.tenant_id == tenant:
            return Path(ft.path)
    else:
        own = session.scalar(
            select(UploadedModel).where(UploadedModel.tenant_id == tenant, UploadedModel.name == model_id)
        )
        if own is not None:
            return Path(own.path)
    raise NotFoundError(
        f"no model {model_id} of yours to download (base models are not downloadable)", param="model"
    )


def delete_model(*, session: Session, tenant: str, model_id: str) -> None:
    """Delete one of the tenant's own models (fine-tuned or uploaded) and its weights: 404 for any other
    (base models, another tenant's); a 400 while a live job trains from it or reads it."""
    if model_id.startswith("ft:"):
        ft = session.get(FineTunedModel, model_id)
        row: FineTunedModel | UploadedModel | None = ft if ft is not None and ft.tenant_id == tenant else None
    else:
        row = session.scalar(
            select(UploadedModel).where(UploadedModel.tenant_id == tenant, UploadedModel.name == model_id)
        )
    if row is None:
        raise NotFoundError(
            f"model: no model {model_id} of yours to delete (base models cannot be deleted)", param="model"
        )
    users = session.scalars(
        select(Job.id).where(
            Job.tenant_id == tenant,
            Job.status.in_(ACTIVE),
            (Job.model == model_id) | (Job.reward_model == model_id),
        )
    ).all()
    if users:
        raise WrongStateError(
            f"model: {model_id} is used by the live job {users[0]}; cancel it or wait for it to end",
            param="model",
        )
    adapters = session.scalars(
        select(UploadedModel.name).where(UploadedModel.tenant_id == tenant, UploadedModel.base == model_id)
    ).all()
    if adapters:
        raise ConflictError(
            f"model: {model_id} is the base of your adapter {adapters[0]}; delete the adapter first",
            param="model",
        )
    shares = checkpoints.shares_of_job(session, row.job_id) if isinstance(row, FineTunedModel) else []
    if shares:
        raise WrongStateError(
            f"model: a checkpoint of {model_id}'s job is shared with {shares[0].tenant_id} (permission "
            f"{shares[0].id}); delete the permissions first (DELETE /v1/fine_tuning/checkpoints/"
            "{checkpoint}/permissions/{id})",
            param="model",
        )
    path = Path(row.path)
    session.delete(row)
    session.flush()
    shutil.rmtree(path, ignore_errors=True)


def upload_model(
    *,
    session: Session,
    tenant: str,
    name: str,
    archive: Path,
    models_dir: Path,
    uploads_dir: Path,
    max_bytes: int,
    base: str | None = None,
) -> UploadedModel:
    """A model folder (or a PEFT LoRA adapter folder, for a model the tenant may use) as the tenant's."""
    if not NAME_RE.fullmatch(name) or name.startswith("ft:") or is_bundled(name):
        raise InvalidRequestError(
            "name: use letters, digits, '.', '_' or '-' (1-128), not a bundled model's name", param="name"
        )
    if (
        name in base_models(models_dir)
        or session.scalar(
            select(UploadedModel).where(UploadedModel.tenant_id == tenant, UploadedModel.name == name)
        )
        is not None
    ):
        raise ConflictError(f"name: a model called {name!r} exists; choose another name", param="name")
    import secrets

    dest = uploads_dir / tenant / f"{name}-{secrets.token_hex(4)}"
    parent: str | None = None
    try:
        size = extract_model(archive, dest, max_bytes=max_bytes)
        if is_adapter(dest):
            parent = adapter_base(
                session=session, tenant=tenant, folder=dest, base=base, models_dir=models_dir
            )
        elif base is not None:
            raise InvalidRequestError(
                "base: only a LoRA adapter (a folder with adapter_config.json) names a base; drop base for a "
                "whole model",
                param="base",
            )
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    row = UploadedModel(tenant_id=tenant, name=name, path=str(dest), bytes=size, base=parent)
    session.add(row)
    session.flush()
    return row


def adapter_base(*, session: Session, tenant: str, folder: Path, base: str | None, models_dir: Path) -> str:
    """The model an uploaded adapter applies to — `base` when given, else its adapter_config's
    base_model_name_or_path (a served name, or a hub id whose name is one: HuggingFaceTB/SmolLM2-135M-Instruct
    is smollm2-135m-instruct) — checked against that model's weights and tokenizer."""
    try:
        named = str(read_config(folder).get("base_model_name_or_path") or "")
    except AdapterError as e:
        raise InvalidRequestError(f"file: {e}", param="file") from None
    candidates = (
        [base] if base is not None else [named, named.rsplit("/", 1)[-1], named.rsplit("/", 1)[-1].lower()]
    )
    param = "base" if base is not None else "file"
    parent: ModelRef | None = None
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            parent = _resolve(
                session=session, tenant=tenant, name=candidate, models_dir=models_dir, param=param
            )
            break
        except InvalidRequestError:
            if base is not None:
                raise
    if parent is None:
        raise InvalidRequestError(
            f"file: adapter_config.json names the base {named!r}, which is not a model you can use here; "
            "give base=<a model id from GET /v1/models>",
            param="file",
        )
    if parent.parent is not None or not parent.whole:
        raise InvalidRequestError(
            f"{param}: {parent.name} is itself an adapter; give the whole model it applies to", param=param
        )
    if parent.tiny and not (parent.path / "config.json").is_file():
        raise InvalidRequestError(
            f"{param}: {parent.name} is not built yet (a bundled model, built on first use); chat with it "
            "once and retry",
            param=param,
        )
    try:
        check_adapter(folder, parent.path)
    except AdapterError as e:
        raise InvalidRequestError(f"file: {e} (base {parent.name})", param="file") from None
    return parent.name


# ---------------------------------------------------------------------------- upload and download

ALLOWED = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|vocab|added_tokens|"
    r"preprocessor_config|model\.safetensors\.index)\.json|merges\.txt|vocab\.txt|chat_template\.jinja|"
    r"tokenizer\.model|spiece\.model|[\w.-]+\.safetensors|README\.md|LICENSE(\.txt)?|"
    # the notes our own `rlhf models` commands write beside the weights (where a model came from):
    # JSON, never loaded as code, so a folder they wrote uploads as it is
    r"gguf_source\.json|tiny_model\.json|"
    # a PEFT LoRA adapter folder
    r"adapter_config\.json"
)
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")


def extract_model(archive: Path, dest: Path, *, max_bytes: int) -> int:
    """Unpack an uploaded model archive (.tar, .tar.gz) into `dest`, checking every member first:
    plain files only, no paths that leave the directory, no pickled weights, a size cap. Returns bytes."""
    import tarfile

    try:
        tf = tarfile.open(archive)  # noqa: SIM115 (closed by the `with tf:` below)
    except (tarfile.TarError, OSError):
        raise InvalidRequestError(
            "file: not a .tar or .tar.gz archive of a model directory", param="file"
        ) from None
    with tf:
        members = [m for m in tf.getmembers() if not m.isdir()]
        names = {}
        total = 0
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts:
                raise InvalidRequestError(
                    f"file: archive member {m.name!r} leaves the model directory", param="file"
                )
            if not m.isfile():
                raise InvalidRequestError(
                    f"file: archive member {m.name!r} is not a plain file (links are refused)", param="file"
                )
            base = parts[-1]
            if base.endswith(PICKLED):
                raise InvalidRequestError(
                    f"file: {base} is pickled weights, which can run code when loaded; upload "
                    "safetensors (model.save_pretrained(dir, safe_serialization=True))",
                    param="file",
                )
            if not ALLOWED.fullmatch(base):
                raise InvalidRequestError(
                    f"file: {base} is not a model file this server accepts (config, tokenizer, "
                    "*.safetensors)",
                    param="file",
                )
            total += m.size
            if total > max_bytes:
                raise InvalidRequestError(
                    f"file: the model is larger than this server's limit of {max_bytes} bytes", param="file"
                )
            names[base] = m
        if len(names) != len(members):
            raise InvalidRequestError("file: the archive holds two files of the same name", param="file")
        adapter = "adapter_config.json" in names
        if adapter and ("adapter_model.safetensors" not in names or "config.json" in names):
            raise InvalidRequestError(
                "file: a LoRA adapter is adapter_config.json with adapter_model.safetensors (and the "
                "tokenizer's files), without a model's config.json; upload the merged model separately",
                param="file",
            )
        if not adapter and ("config.json" not in names or not any(n.endswith(".safetensors") for n in names)):
            raise InvalidRequestError(
                "file: a model needs config.json and *.safetensors weights (or, for a LoRA adapter, "
                "adapter_config.json and adapter_model.safetensors)",
                param="file",
            )
        dest.mkdir(parents=True, exist_ok=False)
        for base, m in names.items():
            src = tf.extractfile(m)
            assert src is not None
            with src, open(dest / base, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    if not adapter:
        check_config(dest / "config.json")
    return total


def check_config(path: Path) -> None:
    import json

    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InvalidRequestError("file: config.json is not valid JSON", param="file") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InvalidRequestError("file: config.json has no model_type", param="file")
    if config.get("auto_map"):
        raise InvalidRequestError(
            "file: config.json needs custom code (auto_map); trust_remote_code is off here", param="file"
        )
    archs = config.get("architectures") or []
    if not any(
        isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel", "ForSequenceClassification"))
        for a in archs
    ):
        raise InvalidRequestError(
            f"file: architectures {archs} hold no causal LM (…ForCausalLM)", param="file"
        )


def archive_model(path: Path, out: Path) -> None:
    """A .tar.gz of a model directory's files (what `extract_model` accepts back)."""
    import tarfile

    with tarfile.open(out, "w:gz") as tf:
        for f in sorted(path.iterdir()):
            if f.is_file() and ALLOWED.fullmatch(f.name):
                tf.add(f, arcname=f.name)
