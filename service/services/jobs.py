"""Fine-tuning jobs: from an OpenAI-shaped request to the per-step options the worker runs, and the
job's life (queued → running → succeeded | failed | cancelled, with pause/resume).

The per-step options are checked by the engine's own config dataclasses (`plan` of `rlhf train`),
so the API refuses exactly what `rlhf sft|reward|ppo` would refuse, naming the same field.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import secrets
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf_engine.config.data import DataConfig, parse_split
from rlhf_engine.config.pipeline import STEP_CLASSES, PipelineConfig, load_pipeline_file, presets
from service.db.models import File, Job, JobCheckpoint, JobEvent, JobMetric, utcnow
from service.errors import Conflict, InvalidRequest, NotFound, from_value_error
from service.schemas import (
    ACTIVE,
    TERMINAL,
    CheckpointObject,
    Cost,
    EstimateRequest,
    EventObject,
    Hyperparameters,
    JobCreate,
    JobError,
    JobObject,
    MetricPoint,
    StepEstimate,
)
from service.services import cost as costs
from service.services import files as files_svc
from service.services import models as models_svc
from service.settings import Settings

SECTION = {1: "sft", 2: "reward", 3: "ppo"}


@dataclasses.dataclass
class Planned:
    method: str
    steps: list[int]
    plan: dict[str, Any]  # {"1": {flat options}, ...}
    file_ids: list[str]
    actor: models_svc.ModelRef
    reward: models_svc.ModelRef | None
    hyperparameters: dict[str, Any]
    estimate: list[costs.StepCost]


# ---------------------------------------------------------------------------- planning


def _method(req: JobCreate) -> tuple[str, Hyperparameters | None]:
    kind = req.method.type if req.method else ("reinforcement" if req.reward_model else "supervised")
    if kind == "dpo":
        raise InvalidRequest("method.type: dpo is not supported yet; use supervised (step 1) or reinforcement "
                             "(steps 1→2→3 with reward_model)", param="method.type")  # fmt: skip
    nested = getattr(req.method, kind, None) if req.method else None
    inner = nested.hyperparameters if nested else None
    if inner is not None and req.hyperparameters is not None:
        raise InvalidRequest(f"hyperparameters and method.{kind}.hyperparameters: give one of them",
                             param="hyperparameters")  # fmt: skip
    return kind, inner or req.hyperparameters


def _steps(req: JobCreate, method: str) -> list[int]:
    if method == "supervised":
        if req.steps not in (None, [1]):
            raise InvalidRequest("steps: a supervised job runs step 1 only; use method reinforcement for steps 2-3",
                                 param="steps")  # fmt: skip
        if req.reward_model:
            raise InvalidRequest("reward_model: only reinforcement jobs train a reward model; drop it or set "
                                 "method.type reinforcement", param="reward_model")  # fmt: skip
        return [1]
    if not req.reward_model:
        raise InvalidRequest("reward_model: a reinforcement job needs the model to train as reward model "
                             "(e.g. tiny-opt-xs)", param="reward_model")  # fmt: skip
    steps = sorted(set(req.steps or [1, 2, 3]))
    if not steps or any(s not in (1, 2, 3) for s in steps):
        raise InvalidRequest("steps: give some of 1, 2, 3", param="steps")
    if 3 in steps and not {1, 2} <= set(steps):
        raise InvalidRequest("steps: step 3 needs steps 1 and 2 in the same job", param="steps")
    return steps


def _file(session: Session, tenant: str, file_id: str | None, param: str, kinds: tuple[str, ...]) -> File | None:
    if file_id is None:
        return None
    try:
        f = files_svc.get_file(session=session, tenant=tenant, file_id=file_id, param=param)
    except NotFound as e:  # a reference inside the body: the request is invalid (OpenAI answers 400 too)
        raise InvalidRequest(e.message, param=param, code="file_not_found") from None
    if f.kind not in kinds:
        raise InvalidRequest(f"{param}: file {file_id} holds {f.kind} data ({f.format}); this role needs "
                             f"{' or '.join(kinds)} data", param=param)  # fmt: skip
    return f


def _apply_hyperparameters(hp: Hyperparameters | None, sections: dict[str, dict[str, Any]], explicit: dict[str, dict[str, Any]],
                           steps: list[int]) -> dict[str, Any]:  # fmt: skip
    """OpenAI's hyperparameters onto the step configs; a field also set in `config` → 400 naming both."""
    shown = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    if hp is None:
        return shown
    for step in steps:
        sec = SECTION[step]
        cls = STEP_CLASSES[step]
        targets: dict[str, Any] = {}
        if hp.n_epochs != "auto":
            targets["num_train_epochs"] = hp.n_epochs
        if hp.batch_size != "auto":
            targets["per_device_train_batch_size" if step < 3 else "per_device_training_batch_size"] = hp.batch_size
        if hp.learning_rate_multiplier != "auto":
            m = float(hp.learning_rate_multiplier)
            names = ["learning_rate"] if step < 3 else ["actor_learning_rate", "critic_learning_rate"]
            for name in names:
                base = sections[sec].get(name, _default(cls, name))
                targets[name] = base * m
        for name, value in targets.items():
            if name in explicit.get(sec, {}):
                hp_name = {"num_train_epochs": "n_epochs"}.get(name, "batch_size" if "batch" in name else
                                                                 "learning_rate_multiplier")  # fmt: skip
                raise InvalidRequest(f"hyperparameters.{hp_name} and config.{sec}.{name} both set {name}; give one",
                                     param=f"hyperparameters.{hp_name}")  # fmt: skip
            sections[sec][name] = value
    return {k: getattr(hp, k) for k in shown}


def _default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def make_plan(*, session: Session, tenant: str, req: JobCreate, settings: Settings, output_dir: Path) -> Planned:
    import argparse

    from rlhf_engine.config.args import dataclass_from_args
    from rlhf_engine.config.pipeline import step_values

    if req.validation_file:
        raise InvalidRequest("validation_file: not supported yet; evaluation rows are held out of the training data "
                             "(config.<step>.eval_fraction)", param="validation_file")  # fmt: skip
    if req.integrations:
        raise InvalidRequest("integrations: not supported", param="integrations")
    if req.gpu_type not in settings.gpu_types:
        raise InvalidRequest(f"gpu_type: {req.gpu_type!r} is not offered here; choose one of "
                             f"{', '.join(settings.gpu_types)}", param="gpu_type")  # fmt: skip
    if req.num_gpus > settings.max_gpus_per_job:
        raise InvalidRequest(f"num_gpus: {req.num_gpus} is above this server's limit of {settings.max_gpus_per_job}",
                             param="num_gpus")  # fmt: skip
    method, hp = _method(req)
    steps = _steps(req, method)
    actor = models_svc.resolve(session=session, tenant=tenant, name=req.model, models_dir=settings.models_dir,
                               param="model", max_bytes=settings.max_model_bytes)  # fmt: skip
    reward = (models_svc.resolve(session=session, tenant=tenant, name=req.reward_model, models_dir=settings.models_dir,
                                 param="reward_model", max_bytes=settings.max_model_bytes)
              if req.reward_model else None)  # fmt: skip

    # data files by role
    train = _file(session, tenant, req.training_file, "training_file",
                  ("sft", "preference") if method == "supervised" else ("preference", "sft"))  # fmt: skip
    pref = _file(session, tenant, req.preference_file, "preference_file", ("preference",))
    prompts = _file(session, tenant, req.prompt_file, "prompt_file", ("preference", "sft"))
    pretrain = _file(session, tenant, req.pretrain_file, "pretrain_file", ("text",))
    if method == "reinforcement" and train is not None and train.kind == "sft" and 2 in steps and pref is None:
        raise InvalidRequest("training_file: an SFT file cannot train the reward model; give a preference file "
                             "(chosen/rejected), or add preference_file", param="training_file")  # fmt: skip
    split = req.data_split or ("10,0,0" if method == "supervised" else "2,4,4")
    try:
        parse_split(split)
    except ValueError as e:
        raise InvalidRequest(str(e), param="data_split") from None

    # preset < request config < hyperparameters
    if req.preset is not None and req.preset not in presets():
        raise InvalidRequest(f"preset: {req.preset!r} is not one of {', '.join(presets())}", param="preset")
    top, sections = load_pipeline_file(req.preset) if req.preset else ({}, {"sft": {}, "reward": {}, "ppo": {}})
    explicit = req.config.model_dump() if req.config else {"sft": {}, "reward": {}, "ppo": {}}
    for sec in SECTION.values():
        for forbidden in ("output_dir", "model_name_or_path", "actor_model_name_or_path", "critic_model_name_or_path",
                          "reward_model_name_or_path", "data", "unsup_data", "overwrite", "resume"):  # fmt: skip
            if forbidden in explicit[sec]:
                raise InvalidRequest(f"config.{sec}.{forbidden}: set by the job itself (model, files, output); "
                                     "remove it", param=f"config.{sec}.{forbidden}")  # fmt: skip
        sections[sec] = {**sections[sec], **explicit[sec]}
    shown_hp = _apply_hyperparameters(hp, sections, explicit, steps)

    data = [train.path] if train else list(DataConfig().data)
    top = {**top, "data": data, "data_split": split}
    if req.seed is not None:
        top["seed"] = req.seed
    if pref is not None:
        sections["reward"] |= {"data": [pref.path], "data_split": "0,10,0"}
        if prompts is None:
            sections["ppo"] |= {"data": [pref.path], "data_split": "0,0,10"}
    if prompts is not None:
        sections["ppo"] |= {"data": [prompts.path], "data_split": "0,0,10"}
    if pretrain is not None:
        sections["ppo"] |= {"unsup_data": [pretrain.path]}
        sections["ppo"].setdefault("unsup_coef", 1.0)
    pipeline_fields = {f.name for f in dataclasses.fields(PipelineConfig)} | {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(top) - pipeline_fields)
    if unknown:
        raise InvalidRequest(f"preset: unknown options {', '.join(unknown)}", param="preset")
    try:
        data_cfg = DataConfig(**{k: v for k, v in top.items() if k in {f.name for f in dataclasses.fields(DataConfig)}})
        cfg = PipelineConfig(actor_model=str(actor.path), reward_model=str(reward.path) if reward else "",
                             output_dir=str(output_dir), step=steps, data=data_cfg,
                             **{k: v for k, v in top.items() if k in {f.name for f in dataclasses.fields(PipelineConfig)}
                                and k != "data"})  # fmt: skip
        plan: dict[str, Any] = {}
        for step in steps:
            values = step_values(cfg, step, sections[SECTION[step]])
            built: Any = dataclass_from_args(STEP_CLASSES[step], argparse.Namespace(), file_values=values)
            _check_limits(built, step, settings)
            _check_fills_a_batch(built, step, [f for f in (train, pref, prompts) if f is not None], req.num_gpus)
            plan[str(step)] = values
    except InvalidRequest:
        raise
    except (ValueError, TypeError) as e:
        raise from_value_error(ValueError(str(e))) from None
    file_ids = [f.id for f in (train, pref, prompts, pretrain) if f is not None]
    estimate = estimate_steps(plan=plan, steps=steps, files=[f for f in (train, pref, prompts) if f is not None],
                              actor_params=_params(actor.path), reward_params=_params(reward.path) if reward else 0.0,
                              gpu_type=req.gpu_type, num_gpus=req.num_gpus)  # fmt: skip
    return Planned(method=method, steps=steps, plan=plan, file_ids=file_ids, actor=actor, reward=reward,
                   hyperparameters=shown_hp, estimate=estimate)  # fmt: skip


def _train_rows_at_most(data: DataConfig, step: int, files: list[File]) -> int | None:
    """The most training rows `step` can get from its datasets (the split as the step makes it, before
    rows the tokeniser leaves out), or None when a dataset is not known here (e.g. a hub id)."""
    from rlhf_engine.data.split import bounds

    by_path = {f.path: f for f in files}
    weights = data.data_weights or [1.0] * len(data.data)
    total = 0.0
    for path, weight in zip(data.data, weights, strict=False):
        kind: str | None
        if path in by_path:
            rows, kind, own_eval = by_path[path].rows, by_path[path].kind, False
        else:
            d = _server_data(path)
            rows, kind, own_eval = d.rows, d.kind, d.own_eval
            if kind is None:
                return None
        n_eval = 0 if own_eval else round(rows * data.eval_fraction)
        n_eval = max(1, n_eval) if not own_eval and data.eval_fraction > 0 and rows >= 2 else n_eval
        train = rows - n_eval
        if kind == "sft":
            got = train if step == 1 else 0
        else:
            cuts = bounds(train, data.shares)
            got = cuts[step] - cuts[step - 1]
        total += got * weight
    return int(total)


def _check_fills_a_batch(built: Any, step: int, files: list[File], num_gpus: int) -> None:
    """A step whose data cannot fill one global batch is refused at submit, not after the queue, the
    model build and the tokenisation (the step itself would stop with the same numbers)."""
    rows = _train_rows_at_most(built.data, step, files)
    if rows is None:
        return
    sec = SECTION[step]
    need, what = built.batch_rows(num_gpus)  # the step's own count, with num_gpus processes
    fix = f"config.{sec}." + ("per_device_train_batch_size or gradient_accumulation_steps" if step < 3 else
                              "per_device_generation_batch_size")  # fmt: skip
    if rows < need:
        raise InvalidRequest(f"config.{sec}: step {step} gets at most {rows} training rows of its data (data_split "
                             f"{built.data.data_split}, eval_fraction {built.data.eval_fraction}), fewer than one "
                             f"batch: {what}; lower {fix}, or give more data", param=f"config.{sec}")  # fmt: skip


def _check_limits(built: Any, step: int, settings: Settings) -> None:
    if built.data.max_seq_len > settings.max_seq_len:
        raise InvalidRequest(f"config.{SECTION[step]}.max_seq_len: {built.data.max_seq_len} is above this server's "
                             f"limit of {settings.max_seq_len}", param=f"config.{SECTION[step]}.max_seq_len")  # fmt: skip
    if built.max_steps > settings.max_steps_per_stage:
        raise InvalidRequest(f"config.{SECTION[step]}.max_steps: above this server's limit of "
                             f"{settings.max_steps_per_stage}", param=f"config.{SECTION[step]}.max_steps")  # fmt: skip


def _params(path: Path) -> float:
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            return costs.params_from_config(json.loads(cfg_file.read_text()))
        except (OSError, ValueError):
            pass
    name = path.name
    if models_svc.TINY_RE.fullmatch(name):
        return {"xs": 0.00053, "s": 0.0034, "m": 0.0258}[name.rsplit("-", 1)[1]]
    if name == models_svc.SMOLLM2:
        return 0.1345
    if name == models_svc.SMOLLM2_RM:
        return 0.0067
    return costs.KNOWN_PARAMS_B.get(name, 1.0)


# ---------------------------------------------------------------------------- estimate


def _rows_and_tokens(paths: list[str], files: list[File]) -> tuple[int, float]:
    """Rows and mean tokens per row of the datasets a step reads (uploaded files or bundled data)."""
    by_path = {f.path: f for f in files}
    rows, tokens = 0, 0
    for p in paths:
        if p in by_path:
            rows += by_path[p].rows
            tokens += by_path[p].tokens_estimate
        else:
            d = _server_data(p)
            r, t = d.rows, d.tokens
            rows, tokens = rows + r, tokens + t
    return rows, (tokens / rows if rows else 0.0)


@dataclasses.dataclass(frozen=True)
class _ServerData:
    rows: int
    tokens: int  # estimated
    kind: str | None  # None: it cannot be read here (e.g. a hub id)
    own_eval: bool  # it has its own eval split


@functools.lru_cache(maxsize=16)
def _server_data(name: str) -> _ServerData:
    """A bundled (or server-side) dataset's size and kind, read once per process."""
    from rlhf_engine.data.readers import read_dataset

    try:
        ds = read_dataset(name)
    except ValueError:
        return _ServerData(0, 0, None, False)
    if ds.kind == "text":
        return _ServerData(len(ds), sum(len(t) for t in ds.texts or []) // files_svc.CHARS_PER_TOKEN, ds.kind, False)
    tokens = sum(len(s.prompt_text) + len(s.chosen) for s in ds.rows) // files_svc.CHARS_PER_TOKEN
    return _ServerData(len(ds.rows), tokens, ds.kind, ds.eval_rows is not None)


def estimate_steps(*, plan: dict[str, Any], steps: list[int], files: list[File], actor_params: float,
                   reward_params: float, gpu_type: str, num_gpus: int,
                   tokens_override: dict[str, int] | None = None) -> list[costs.StepCost]:  # fmt: skip
    out = []
    for step in steps:
        v = plan[str(step)]
        cls = STEP_CLASSES[step]
        get = lambda name, v=v, cls=cls: v.get(name, _default(cls, name))  # noqa: E731
        params = reward_params if step == 2 else actor_params
        if tokens_override and str(step) in tokens_override:
            tokens = int(tokens_override[str(step)])
        else:
            rows, per_row = _rows_and_tokens(list(v.get("data") or DataConfig().data), files)
            share = parse_split(v.get("data_split", DataConfig().data_split))[step - 1]
            usable = rows * share * (1 - v.get("eval_fraction", DataConfig().eval_fraction))
            epochs = get("num_train_epochs")
            if step < 3:
                batch = get("per_device_train_batch_size") * get("gradient_accumulation_steps") * num_gpus
                n = usable * epochs if not get("max_steps") else min(usable * epochs, get("max_steps") * batch)
                seq = min(per_row, v.get("max_seq_len", DataConfig().max_seq_len))
                tokens = int(n * seq * (2 if step == 2 else 1))
            else:
                batch = get("per_device_generation_batch_size") * get("generation_batches") * num_gpus
                n = usable * epochs if not get("max_steps") else min(usable * epochs, get("max_steps") * batch)
                prompt = min(per_row * 0.5, v.get("max_prompt_len", DataConfig().max_prompt_len))
                tokens = int(n * (prompt + get("max_answer_len")))
        out.append(costs.step_cost(step, tokens=tokens, params_b=params, gpu_type=gpu_type, num_gpus=num_gpus))
    return out


def estimate(*, session: Session, tenant: str, req: EstimateRequest, settings: Settings) -> dict[str, Any]:
    body = req.model_dump(exclude={"tokens", "model_parameters", "reward_model_parameters"})
    job_req = JobCreate(**body)
    method, _ = _method(job_req)
    steps = _steps(job_req, method)
    if req.model_parameters or req.tokens:  # planning for a model / data not on this server
        if req.gpu_type not in settings.gpu_types:
            raise InvalidRequest(f"gpu_type: {req.gpu_type!r} is not offered here; choose one of "
                                 f"{', '.join(settings.gpu_types)}", param="gpu_type")  # fmt: skip
        for name, count in (req.tokens or {}).items():
            if name not in ("1", "2", "3") or count < 0:
                raise InvalidRequest(f"tokens: {name!r}: {count} must be a step (1, 2 or 3) and a count of at least "
                                     "0 tokens, e.g. {'3': 135000000}", param="tokens")  # fmt: skip
        actor_p = (req.model_parameters or 1e9) / 1e9
        reward_p = (req.reward_model_parameters or 3.5e8) / 1e9
        plan: dict[str, Any] = {str(s): {} for s in steps}
        est = estimate_steps(plan=plan, steps=steps, files=[], actor_params=actor_p, reward_params=reward_p,
                             gpu_type=req.gpu_type, num_gpus=req.num_gpus, tokens_override=req.tokens)  # fmt: skip
    else:
        est = make_plan(session=session, tenant=tenant, req=job_req, settings=settings,
                        output_dir=settings.runs_dir / tenant / "estimate").estimate  # planned only, never written
    seconds = sum(s.seconds for s in est)
    usd = sum(s.usd for s in est)
    return {"seconds": seconds, "hours": seconds / 3600, "usd": usd, "gpu_type": req.gpu_type, "num_gpus": req.num_gpus,
            "price_per_gpu_hour": costs.price(req.gpu_type),
            "steps": [StepEstimate(step=s.step, tokens=s.tokens, seconds=s.seconds, usd=s.usd) for s in est]}  # fmt: skip


# ---------------------------------------------------------------------------- create, read


def request_hash(req: JobCreate) -> str:
    return hashlib.sha256(json.dumps(req.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def create_job(*, session: Session, tenant: str, req: JobCreate, settings: Settings,
               idempotency_key: str | None = None) -> tuple[Job, bool]:  # fmt: skip
    """(job, created). The same Idempotency-Key with the same body returns the first job."""
    digest = request_hash(req)
    if idempotency_key:
        if len(idempotency_key) > 255:
            raise InvalidRequest("Idempotency-Key: at most 255 characters", param="Idempotency-Key")
        prior = session.scalar(select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == idempotency_key))
        if prior is not None:
            if prior.request_hash != digest:
                raise Conflict("Idempotency-Key was used with a different request body; use a new key",
                               param="Idempotency-Key")  # fmt: skip
            return prior, False
    job_id = f"ftjob-{secrets.token_hex(12)}"
    output_dir = settings.runs_dir / tenant / job_id
    planned = make_plan(session=session, tenant=tenant, req=req, settings=settings, output_dir=output_dir)
    est_s = sum(s.seconds for s in planned.estimate)
    if settings.max_active_jobs or settings.max_queued_gpu_hours:
        from service.db.models import Tenant
        from service.limits import check_job_quota

        session.execute(select(Tenant.id).where(Tenant.id == tenant).with_for_update())  # one create at a time
        check_job_quota(session=session, tenant=tenant, settings=settings, gpu_hours=est_s * req.num_gpus / 3600)
    job = Job(id=job_id, tenant_id=tenant, status="queued", method=planned.method, model=req.model,
              reward_model=req.reward_model, suffix=req.suffix,
              seed=req.seed if req.seed is not None else int(planned.plan[str(planned.steps[0])].get("seed", 1234)),
              training_file=req.training_file, validation_file=req.validation_file, file_ids=planned.file_ids,
              request=req.model_dump(mode="json") | {"_hyperparameters": planned.hyperparameters}, plan=planned.plan,
              job_metadata=req.metadata, steps=planned.steps, step_status={str(s): "pending" for s in planned.steps},
              num_gpus=req.num_gpus, gpu_type=req.gpu_type, max_cost_usd=req.max_cost_usd,
              estimated_usd=sum(s.usd for s in planned.estimate), estimated_seconds=est_s,
              output_dir=str(output_dir), idempotency_key=idempotency_key, request_hash=digest,
              estimated_finish=utcnow() + timedelta(seconds=est_s), enqueued_at=utcnow())  # fmt: skip
    session.add(job)
    session.flush()
    add_event(session=session, job=job, type_="job_created", message=f"job created: {planned.method}, steps "
              f"{', '.join(map(str, planned.steps))}; estimate {est_s / 60:.1f} min, ${job.estimated_usd:.2f}",
              data={"estimate": [dataclasses.asdict(s) for s in planned.estimate]})  # fmt: skip
    return job, True


def submit_job(*, session: Session, tenant: str, req: JobCreate, settings: Settings,
               idempotency_key: str | None = None) -> Job:  # fmt: skip
    """Create the job, commit it (on record before any worker looks for it), then enqueue it."""
    from service.queue import enqueue_training

    job, created = create_job(session=session, tenant=tenant, req=req, settings=settings,
                              idempotency_key=idempotency_key)  # fmt: skip
    session.commit()
    if created:
        enqueue_training(job.id, settings)
    return job


def resume_job(*, session: Session, tenant: str, job_id: str, settings: Settings) -> Job:
    """Resume a paused job: committed, then re-enqueued."""
    from service.queue import enqueue_training

    job = resume(session=session, tenant=tenant, job_id=job_id, settings=settings)
    session.commit()
    enqueue_training(job.id, settings)
    return job


def get_job(*, session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant:
        raise NotFound(f"no fine-tuning job {job_id}", param="fine_tuning_job_id")
    return job


def list_jobs(*, session: Session, tenant: str, after: str | None, limit: int) -> tuple[list[Job], bool]:
    q = select(Job).where(Job.tenant_id == tenant).order_by(Job.created_at.desc(), Job.id.desc())
    if after:
        anchor = get_job(session=session, tenant=tenant, job_id=after)
        q = q.where((Job.created_at < anchor.created_at) | ((Job.created_at == anchor.created_at) & (Job.id < anchor.id)))
    rows = list(session.scalars(q.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def _ts(d: datetime | None) -> int | None:
    return int(d.timestamp()) if d else None


def to_object(job: Job) -> JobObject:
    req = job.request or {}
    method_obj: dict[str, Any] = {"type": job.method, job.method: {"hyperparameters": req.get("_hyperparameters", {})}}
    return JobObject(
        id=job.id, created_at=int(job.created_at.timestamp()), finished_at=_ts(job.finished_at),
        estimated_finish=_ts(job.estimated_finish) if job.status in ("queued", "running") else None,
        model=job.model, fine_tuned_model=job.fine_tuned_model, organization_id=job.tenant_id, status=job.status,  # type: ignore[arg-type]
        training_file=job.training_file, validation_file=job.validation_file,
        hyperparameters=req.get("_hyperparameters", {}), method=method_obj,
        trained_tokens=job.trained_tokens if job.status == "succeeded" else None,
        error=JobError(**job.error) if job.error else None, seed=job.seed, suffix=job.suffix,
        metadata=job.job_metadata, reward_model=job.reward_model, steps=job.steps, current_step=job.current_step,
        step_status=job.step_status, progress=round(job.progress, 4),
        cost=Cost(estimated_usd=round(job.estimated_usd, 6), accrued_usd=round(job.accrued_usd, 6),
                  gpu_seconds=round(job.gpu_seconds, 3), max_cost_usd=job.max_cost_usd),
        num_gpus=job.num_gpus, gpu_type=job.gpu_type,
    )  # fmt: skip


# ---------------------------------------------------------------------------- transitions


def cancel(*, session: Session, tenant: str, job_id: str) -> Job:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if job.status in TERMINAL:
        raise Conflict(f"job {job_id} is already {job.status}; only a live job can be cancelled", param="fine_tuning_job_id")
    job.control = "cancel" if job.status == "running" else None
    job.status = "cancelled"
    job.finished_at = utcnow()
    add_event(session=session, job=job, type_="cancelled", message="job cancelled by the user")
    return job


def pause(*, session: Session, tenant: str, job_id: str) -> Job:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if job.status not in ("queued", "running"):
        raise Conflict(f"job {job_id} is {job.status}; only a queued or running job can be paused",
                       param="fine_tuning_job_id")  # fmt: skip
    if job.status == "queued":
        job.status = "paused"
        add_event(session=session, job=job, type_="paused", message="job paused before it started")
    else:
        job.control = "pause"  # the worker checkpoints, stops, and marks it paused
        add_event(session=session, job=job, type_="pause_requested", message="pause requested; the running step "
                  "checkpoints and stops")  # fmt: skip
    return job


def resume(*, session: Session, tenant: str, job_id: str, settings: Settings) -> Job:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    if job.status != "paused":
        raise Conflict(f"job {job_id} is {job.status}; only a paused job can be resumed", param="fine_tuning_job_id")
    interval = costs.interval_usd(settings.cost_interval_s, num_gpus=job.num_gpus, gpu_type=job.gpu_type)
    if costs.budget_exhausted(accrued_usd=job.accrued_usd, max_cost_usd=job.max_cost_usd, interval_usd=interval):
        raise Conflict(f"job {job_id} has spent ${job.accrued_usd:.6f} of its max_cost_usd ${job.max_cost_usd}; "
                       "it cannot resume within its budget", param="max_cost_usd")  # fmt: skip
    job.status = "queued"
    job.control = None
    job.enqueued_at = utcnow()
    add_event(session=session, job=job, type_="resumed", message="job resumed; it continues from its checkpoint")
    return job


# ---------------------------------------------------------------------------- events, metrics, checkpoints


def add_event(*, session: Session, job: Job, type_: str, message: str, level: str = "info", step: int | None = None,
              data: dict[str, Any] | None = None, source_key: str | None = None) -> None:  # fmt: skip
    if source_key is not None and session.scalar(
            select(JobEvent.seq).where(JobEvent.job_id == job.id, JobEvent.source_key == source_key)) is not None:
        return  # recorded once, whoever records it again (a worker redoing a finished step's bookkeeping)
    session.add(JobEvent(job_id=job.id, type=type_, message=message, level=level, step=step, data=data,
                         source_key=source_key))  # fmt: skip


def list_events(*, session: Session, tenant: str, job_id: str, after: str | None, limit: int) -> tuple[list[JobEvent], bool]:
    get_job(session=session, tenant=tenant, job_id=job_id)
    q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc())
    if after:
        anchor = session.scalar(select(JobEvent).where(JobEvent.id == after, JobEvent.job_id == job_id))
        if anchor is None:
            raise NotFound(f"after: no event {after} in job {job_id}", param="after")
        q = q.where(JobEvent.seq < anchor.seq)
    rows = list(session.scalars(q.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def events_since(*, session: Session, job_id: str, seq: int) -> list[JobEvent]:
    """Events newer than `seq`, oldest first (for live streams)."""
    q = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > seq).order_by(JobEvent.seq)
    return list(session.scalars(q))


async def follow(*, db_url: str, job_id: str, metrics: bool = False,
                 poll_s: float = 0.5) -> AsyncIterator[EventObject | MetricPoint | JobObject]:  # fmt: skip
    """Every event (and, with `metrics`, every metric point) of a job from the start, then live ones
    until the job ends or pauses, what was written as it ended, and last the job itself. Shared by
    REST's `events?stream=true` and gRPC's WatchJob; the caller has checked the job is the tenant's."""
    import asyncio

    from service.db.session import session_scope

    seq, metric_id = 0, 0

    def poll() -> tuple[list[EventObject | MetricPoint], bool, JobObject | None]:
        nonlocal seq, metric_id
        with session_scope(db_url) as s:
            events = events_since(session=s, job_id=job_id, seq=seq)
            points = metrics_since(session=s, job_id=job_id, after_id=metric_id) if metrics else []
            seq = events[-1].seq if events else seq
            metric_id = points[-1][0] if points else metric_id
            job = s.get(Job, job_id)
            items: list[EventObject | MetricPoint] = [event_object(e) for e in events] + [p for _, p in points]
            if job is None:
                return items, True, None
            return items, job.status in TERMINAL or job.status == "paused", to_object(job)

    while True:
        items, ended, job = await asyncio.to_thread(poll)
        for item in items:
            yield item
        if ended:
            items, _, job = await asyncio.to_thread(poll)  # what was written as it ended
            for item in items:
                yield item
            if job is not None:
                yield job
            return
        await asyncio.sleep(poll_s)


def event_object(e: JobEvent) -> EventObject:
    kind: Literal["message", "metrics"] = "metrics" if e.type == "metrics" else "message"
    data = dict(e.data or {}) | ({"step": e.step} if e.step is not None else {}) | {"event_type": e.type}
    return EventObject(id=e.id, created_at=int(e.created_at.timestamp()), level=e.level, message=e.message,
                       type=kind, data=data)  # fmt: skip


def list_checkpoints(*, session: Session, tenant: str, job_id: str, after: str | None,
                     limit: int) -> tuple[list[JobCheckpoint], bool]:  # fmt: skip
    get_job(session=session, tenant=tenant, job_id=job_id)
    q = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id).order_by(
        JobCheckpoint.step.desc(), JobCheckpoint.global_step.desc())  # fmt: skip
    rows = list(session.scalars(q))
    if after:
        ids = [c.id for c in rows]
        if after not in ids:
            raise NotFound(f"after: no checkpoint {after} in job {job_id}", param="after")
        rows = rows[ids.index(after) + 1 :]
    return rows[:limit], len(rows) > limit


def checkpoint_object(c: JobCheckpoint, job: Job) -> CheckpointObject:
    name = f"{job.fine_tuned_model or models_svc.fine_tuned_id(job.model, job.suffix, job.id)}:ckpt-step{c.step}-{c.global_step}"
    return CheckpointObject(id=c.id, created_at=int(c.created_at.timestamp()), fine_tuned_model_checkpoint=name,
                            fine_tuning_job_id=job.id, metrics=(c.metrics or {}) | {"step": c.global_step},
                            step_number=c.global_step, step=c.step)  # fmt: skip


def list_metrics(*, session: Session, tenant: str, job_id: str, step: int | None, after: int, limit: int) -> tuple[list[MetricPoint], bool]:
    get_job(session=session, tenant=tenant, job_id=job_id)
    q = select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.id > after).order_by(JobMetric.id)
    if step is not None:
        q = q.where(JobMetric.step == step)
    rows = list(session.scalars(q.limit(limit + 1)))
    return [MetricPoint(id=m.id, step=m.step, global_step=m.global_step, time=m.time, values=m.values)
            for m in rows[:limit]], len(rows) > limit  # fmt: skip


def metrics_since(*, session: Session, job_id: str, after_id: int) -> list[tuple[int, MetricPoint]]:
    """(row id, point) of metrics newer than `after_id`, oldest first (for live streams)."""
    rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job_id, JobMetric.id > after_id)
                           .order_by(JobMetric.id))  # fmt: skip
    return [(m.id, MetricPoint(id=m.id, step=m.step, global_step=m.global_step, time=m.time, values=m.values))
            for m in rows]  # fmt: skip


def list_rollouts(*, session: Session, tenant: str, job_id: str, offset: int, limit: int) -> tuple[list[dict[str, Any]], bool]:
    job = get_job(session=session, tenant=tenant, job_id=job_id)
    path = Path(job.output_dir) / "step3_rlhf" / "rollouts.jsonl"
    if not path.is_file():
        return [], False
    out: list[dict[str, Any]] = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < offset:
                continue
            if len(out) > limit:
                break
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out[:limit], len(out) > limit


__all__ = ["ACTIVE", "cancel", "create_job", "estimate", "get_job", "list_jobs", "pause", "resume", "to_object"]
