"""From an OpenAI-shaped job request to the per-step options the worker runs, with its estimate.

The per-step options are checked by the engine's own config dataclasses (`plan` of `rlhf train`),
so the API refuses exactly what `rlhf sft|reward|ppo` would refuse, naming the same field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from rlhf_engine.config.data import DataConfig, parse_split
from rlhf_engine.config.pipeline import (
    RUNS,
    SECTIONS,
    STEPS,
    PipelineConfig,
    Step,
    load_pipeline_file,
    presets,
)
from service.db.models import File
from service.errors import InvalidRequestError, NotFoundError, from_value_error
from service.jobs import hyper
from service.jobs.estimate import estimate_steps, model_params, server_data
from service.jobs.memory import Shapes, plan_step_memory, shape_of
from service.schemas import (
    EstimateRequest,
    Hyperparameters,
    JobCreate,
    ReinforcementHyperparameters,
    StepEstimate,
)
from service.services import cluster
from service.services import cost as costs
from service.services import files as files_svc
from service.services import models as models_svc
from service.settings import Settings


def _no_sections() -> dict[str, dict[str, Any]]:
    return {sec: {} for sec in SECTIONS}


# a job's method.type → the kind of run it is (rlhf_engine.config.pipeline.RUNS: its steps)
RUN_OF_METHOD = {"supervised": "sft", "dpo": "dpo", "reinforcement": "rlhf"}


def step_table(method: str) -> dict[int, Step]:
    """A job method's steps (supervised: step 1 of the RLHF table; dpo: SFT then DPO)."""
    return STEPS[RUNS[RUN_OF_METHOD[method]].table]


@dataclasses.dataclass
class Planned:
    method: str
    steps: list[int]
    plan: dict[str, Any]  # {"1": {flat options}, ...}
    file_ids: list[str]
    actor: models_svc.ModelRef
    reward: models_svc.ModelRef | None
    hyperparameters: dict[str, Any]  # as given ("auto" where not)
    resolved_hyperparameters: dict[str, Any]  # the values the job runs with (shown once it starts)
    estimate: list[costs.StepCost]
    memory: list[dict[str, Any]]  # per step: the memory plan (service.jobs.memory)


def _method(req: JobCreate) -> tuple[str, Hyperparameters | None]:
    kind = req.method.type if req.method else ("reinforcement" if req.reward_model else "supervised")
    nested = getattr(req.method, kind, None) if req.method else None
    inner = nested.hyperparameters if nested else None
    if inner is not None and req.hyperparameters is not None:
        raise InvalidRequestError(
            f"hyperparameters and method.{kind}.hyperparameters: give one of them", param="hyperparameters"
        )
    return kind, inner or req.hyperparameters


def _grader(req: JobCreate) -> dict[str, Any] | None:
    """The reinforcement method's grader, checked (400 naming the field), or None (RLHF with reward_model)."""
    from rlhf_engine import graders

    params = req.method.reinforcement if req.method and req.method.type == "reinforcement" else None
    if params is None or params.grader is None:
        return None
    try:
        graders.parse(params.grader, "method.reinforcement.grader")
    except graders.GraderError as e:
        raise InvalidRequestError(str(e), param=e.param) from None
    return params.grader


def _response_format(req: JobCreate) -> str | None:
    """The reinforcement method's response_format as step 3's option (JSON), checked (a schema the grammar
    engine cannot compile is a 400 naming the field), or None."""
    import json

    from rlhf_engine.chat import structured
    from rlhf_engine.chat.errors import ChatRequestError

    params = req.method.reinforcement if req.method and req.method.type == "reinforcement" else None
    shape = params.response_format if params is not None else None
    if shape is None or shape.type == "text":
        return None
    given = shape.model_dump(mode="json", by_alias=True, exclude_none=True)
    try:
        structured.grammar_of(given, where="method.reinforcement.response_format")
    except ChatRequestError as e:
        raise InvalidRequestError(e.message, param=e.param) from None
    return json.dumps(given, sort_keys=True)


def _graded_steps(req: JobCreate, train_kind: str | None) -> list[int]:
    """A grader job: step 3 on prompts, after SFT (step 1) when the training data has answers."""
    if req.reward_model:
        raise InvalidRequestError(
            "reward_model: with a grader, the grader is the reward and no reward model is trained; "
            "drop reward_model, or drop method.reinforcement.grader for RLHF",
            param="reward_model",
        )
    default = [3] if train_kind == "prompt" else list(RUNS["grpo"].steps)
    steps = sorted(set(req.steps)) if req.steps else default
    if steps not in ([3], list(RUNS["grpo"].steps)):
        raise InvalidRequestError(
            "steps: a grader job runs step 3, after step 1 (SFT) when the data has answers; give "
            "[1, 3] or [3]",
            param="steps",
        )
    if 1 in steps and train_kind == "prompt":
        raise InvalidRequestError(
            "steps: the training file holds prompts only, so step 1 (SFT) has no answers to learn; "
            "give steps [3], or a training file with answers",
            param="steps",
        )
    return steps


def _steps(req: JobCreate, method: str) -> list[int]:
    own = list(RUNS[RUN_OF_METHOD[method]].steps)
    if method == "supervised":
        if req.steps not in (None, own):
            raise InvalidRequestError(
                "steps: a supervised job runs step 1 only; use method reinforcement for steps 2-3",
                param="steps",
            )
        if req.reward_model:
            raise InvalidRequestError(
                "reward_model: only reinforcement jobs train a reward model; drop it or set "
                "method.type reinforcement",
                param="reward_model",
            )
        return own
    if method == "dpo":
        if req.reward_model:
            raise InvalidRequestError(
                "reward_model: a dpo job learns from the preference pairs directly and trains no reward "
                "model; drop it, or set method.type reinforcement",
                param="reward_model",
            )
        own = own if _sft_first(req) else [2]
        if req.steps not in (None, own):
            raise InvalidRequestError(
                f"steps: this dpo job runs step{'s 1 and 2 (SFT, then DPO)' if len(own) > 1 else ' 2 (DPO)'}"
                "; drop steps (method.dpo.sft_first: true runs SFT first)",
                param="steps",
            )
        return own
    if not req.reward_model:
        raise InvalidRequestError(
            "reward_model: a reinforcement job needs the model to train as reward model (e.g. tiny-opt-xs)",
            param="reward_model",
        )
    steps = sorted(set(req.steps or own))
    if not steps or any(s not in own for s in steps):
        raise InvalidRequestError("steps: give some of 1, 2, 3", param="steps")
    if 3 in steps and not {1, 2} <= set(steps):
        raise InvalidRequestError("steps: step 3 needs steps 1 and 2 in the same job", param="steps")
    return steps


def _sft_first(req: JobCreate) -> bool:
    """A dpo job in DeepSpeed-Chat's order (SFT on part of the pairs, then DPO on the rest), our option;
    OpenAI's dpo trains the given model on all the pairs."""
    return bool(req.method and req.method.dpo and req.method.dpo.sft_first)


def _file(
    session: Session, tenant: str, file_id: str | None, param: str, kinds: tuple[str, ...]
) -> File | None:
    if file_id is None:
        return None
    try:
        f = files_svc.get_file(session=session, tenant=tenant, file_id=file_id, param=param)
    except NotFoundError as e:  # a reference inside the body: the request is invalid (OpenAI answers 400 too)
        raise InvalidRequestError(e.message, param=param, code="file_not_found") from None
    if f.kind not in kinds:
        raise InvalidRequestError(
            f"{param}: file {file_id} holds {f.kind} data ({f.format}); this role needs "
            f"{' or '.join(kinds)} data",
            param=param,
        )
    return f


def _apply_hyperparameters(
    hp: Hyperparameters | None, explicit: dict[str, dict[str, Any]], steps: list[int], method: str
) -> dict[str, Any]:
    """The hyperparameters as the job shows them before it starts ("auto" or the value given); a
    hyperparameter whose options `config` also sets → 400 naming both. Their values are applied per
    step by `_plan_steps` (service/jobs/hyper.py), which knows each step's rows."""
    shown: dict[str, Any] = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    if method == "dpo":
        shown["beta"] = "auto"
    if isinstance(hp, ReinforcementHyperparameters) or method == "reinforcement":
        shown |= dict.fromkeys(("eval_interval", "eval_samples", "compute_multiplier"), "auto")
        shown["reasoning_effort"] = "default"
    if hp is None:
        return shown
    table = step_table(method)
    for name in shown:
        value = getattr(hp, name, "auto")
        if value in ("auto", None):
            continue
        shown[name] = value
        for step in steps:
            sec = table[step].command
            for option in hyper.HP_OPTIONS[name]:
                if option in explicit.get(sec, {}):
                    raise InvalidRequestError(
                        f"hyperparameters.{name} and config.{sec}.{option} both set {option}; give one",
                        param=f"hyperparameters.{name}",
                    )
    return shown


def _wandb_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("wandb") is not None
    except ValueError:  # (imported as None: blocked)
        return False


def _integrations(req: JobCreate) -> dict[str, Any]:
    """OpenAI's `integrations` as step options (the wandb_* fields of every step's config)."""
    for item in req.integrations or []:
        if not _wandb_installed():
            raise InvalidRequestError(
                "integrations[0]: the wandb integration needs the wandb library on this server; "
                "install the extra (pip install 'rlhf-service[wandb]') or drop the integration",
                param="integrations",
            )
        w = item.wandb
        return {
            "wandb_project": w.project,
            "wandb_name": w.name or "",
            "wandb_entity": w.entity or "",
            "wandb_tags": list(w.tags or []),
        }
    return {}


def _check_gpu_type(gpu_type: str, settings: Settings) -> None:
    if gpu_type not in settings.gpu_types:
        raise InvalidRequestError(
            f"gpu_type: {gpu_type!r} is not offered here; choose one of {', '.join(settings.gpu_types)}",
            param="gpu_type",
        )


@dataclasses.dataclass
class Inputs:
    """A job request's inputs, resolved and checked together: its method and steps, its models, its
    files by role, its data split (stage 1 of `make_plan`)."""

    method: str
    hp: Hyperparameters | None
    grader: dict[str, Any] | None
    steps: list[int]
    actor: models_svc.ModelRef
    reward: models_svc.ModelRef | None
    train: File | None
    pref: File | None
    prompts: File | None
    pretrain: File | None
    valid: File | None
    split: str
    tracking: dict[str, Any]

    @property
    def data_files(self) -> list[File]:
        """The files the steps train on (not the pretraining text)."""
        return [f for f in (self.train, self.pref, self.prompts) if f is not None]


def make_plan(
    *, session: Session, tenant: str, req: JobCreate, settings: Settings, output_dir: Path
) -> Planned:
    """A job request, in one pass: its inputs resolved (files, models, grader, steps), the step options
    built, each step's config checked and its memory planned, then the estimate."""
    inputs = _resolve(session=session, tenant=tenant, req=req, settings=settings)
    cfg, sections, explicit, shown_hp = _options(req, inputs, output_dir)
    plan, memory, resolved = _plan_steps(req, inputs, cfg, sections, explicit, settings, shown_hp)
    actor, reward = inputs.actor, inputs.reward
    return Planned(
        method=inputs.method,
        steps=inputs.steps,
        plan=plan,
        file_ids=[f.id for f in (*inputs.data_files, inputs.pretrain, inputs.valid) if f is not None],
        actor=actor,
        reward=reward,
        hyperparameters=shown_hp,
        resolved_hyperparameters=resolved,
        estimate=estimate_steps(
            plan=plan,
            steps=inputs.steps,
            method=inputs.method,
            files=inputs.data_files,
            actor_params=model_params(actor.path),
            reward_params=model_params(reward.path) if reward else 0.0,
            gpu_type=req.gpu_type,
            num_gpus=req.num_gpus,
        ),
        memory=memory,
    )


def _check_nodes(req: JobCreate, settings: Settings) -> None:
    """`nodes` and `gpus_per_node` against `num_gpus` (GPUs in all) and this server: sets num_gpus from
    the two when gpus_per_node is given (or `nodes` alone: one GPU on each)."""
    if req.nodes > settings.max_nodes_per_job:
        how = (
            "this server runs each step on one machine (RLHF_LAUNCH_BACKEND=local); ask for nodes 1"
            if settings.launch_backend == "local"
            else f"ask for at most {settings.max_nodes_per_job} (RLHF_MAX_NODES_PER_JOB)"
        )
        raise InvalidRequestError(
            f"nodes: {req.nodes} is above this server's limit of {settings.max_nodes_per_job}; {how}",
            param="nodes",
        )
    cluster.check_nodes(req.nodes, settings)
    explicit = "num_gpus" in req.model_fields_set
    per_node = req.gpus_per_node if req.gpus_per_node is not None or explicit else 1
    if per_node is not None:
        total = req.nodes * per_node
        if explicit and req.num_gpus != total:
            raise InvalidRequestError(
                f"num_gpus: {req.num_gpus} is not nodes × gpus_per_node ({req.nodes} × {per_node} "
                f"= {total}); send num_gpus {total}, or leave it out",
                param="num_gpus",
            )
        req.num_gpus = total
    elif req.num_gpus % req.nodes:
        raise InvalidRequestError(
            f"nodes: {req.num_gpus} GPUs do not split evenly over {req.nodes} nodes; "
            "set gpus_per_node (num_gpus = nodes × gpus_per_node)",
            param="nodes",
        )


def _resolve(*, session: Session, tenant: str, req: JobCreate, settings: Settings) -> Inputs:
    """Stage 1: the request's method, steps, models and files, each checked against the others."""
    tracking = _integrations(req)
    _check_gpu_type(req.gpu_type, settings)
    _check_nodes(req, settings)
    if req.num_gpus > settings.max_gpus_per_job:
        raise InvalidRequestError(
            f"num_gpus: {req.num_gpus} is above this server's limit of {settings.max_gpus_per_job}",
            param="num_gpus",
        )
    method, hp = _method(req)
    grader = _grader(req)
    if grader is not None:  # its judges exist for this tenant and are chat models (400 naming the field)
        from rlhf_engine import graders
        from service.services import judges

        parsed = graders.parse(grader, "method.reinforcement.grader")
        judges.check_models(session=session, tenant=tenant, grader=parsed, settings=settings)
    if req.evals:  # each as a run of it would be checked, its model (the job's) filled in later
        from service.services import evals as evals_svc

        job_evals = [e.model_dump() for e in req.evals]
        evals_svc.check_job_evals(session=session, tenant=tenant, given=job_evals, settings=settings)
    steps = _steps(req, method) if grader is None else []

    def resolve(name: str, param: str) -> models_svc.ModelRef:
        ref = models_svc.resolve(
            session=session,
            tenant=tenant,
            name=name,
            models_dir=settings.models_dir,
            param=param,
            max_bytes=settings.max_model_bytes,
        )
        if not ref.whole:
            raise InvalidRequestError(
                f"{param}: {name} is an uploaded LoRA adapter, which is served but not trained from; "
                f"fine-tune its base ({ref.base}) or upload the merged model",
                param=param,
            )
        return ref

    actor = resolve(req.model, "model")
    reward = resolve(req.reward_model, "reward_model") if req.reward_model else None

    # data files by role
    train_kinds = {"supervised": ("sft",), "dpo": ("preference", "sft")}.get(
        method, ("preference", "sft", "prompt") if grader is not None else ("preference", "sft")
    )
    train = _file(session, tenant, req.training_file, "training_file", train_kinds)
    pref = _file(session, tenant, req.preference_file, "preference_file", ("preference",))
    prompts = _file(session, tenant, req.prompt_file, "prompt_file", ("preference", "prompt"))
    pretrain = _file(session, tenant, req.pretrain_file, "pretrain_file", ("text",))
    valid = _file(session, tenant, req.validation_file, "validation_file", train_kinds)
    if valid is not None and train is not None and valid.kind != train.kind:
        raise InvalidRequestError(
            f"validation_file: file {valid.id} holds {valid.kind} data ({valid.format}) and the training "
            f"file {train.kind} data ({train.format}); give validation rows in the training file's format",
            param="validation_file",
        )
    if grader is not None:
        steps = _graded_steps(req, train.kind if train else None)
        if pref is not None:
            raise InvalidRequestError(
                "preference_file: a grader job trains no reward model; give prompts as prompt_file "
                "(or in training_file)",
                param="preference_file",
            )
        if train is not None and train.kind == "sft" and prompts is None:
            raise InvalidRequestError(
                "prompt_file: step 3 needs prompts with the fields the grader reads, and an SFT "
                "training file feeds step 1 only; add prompt_file (rows of messages ending with "
                "the user's turn, plus the grader's fields)",
                param="prompt_file",
            )
    if (
        method == "reinforcement"
        and train is not None
        and train.kind == "sft"
        and 2 in steps
        and pref is None
    ):
        raise InvalidRequestError(
            "training_file: an SFT file cannot train the reward model; give a preference file "
            "(chosen/rejected), or add preference_file",
            param="training_file",
        )
    if method == "dpo":
        if train is not None and train.kind == "sft" and pref is None:
            raise InvalidRequestError(
                "training_file: DPO learns from chosen/rejected pairs and this file has none; give a "
                "preference file, or add preference_file",
                param="training_file",
            )
        for param, given in (("prompt_file", prompts), ("pretrain_file", pretrain)):
            if given is not None:
                raise InvalidRequestError(
                    f"{param}: a dpo job has no step 3 (PPO) to use it; drop it, or set method.type "
                    "reinforcement",
                    param=param,
                )
    split = req.data_split or {"supervised": "10,0,0", "dpo": "4,6,0" if _sft_first(req) else "0,10,0"}.get(
        method, "2,4,4" if grader is None else "5,0,5"
    )
    try:
        parse_split(split)
    except ValueError as e:
        raise InvalidRequestError(str(e), param="data_split") from None
    return Inputs(
        method=method,
        hp=hp,
        grader=grader,
        steps=steps,
        actor=actor,
        reward=reward,
        train=train,
        pref=pref,
        prompts=prompts,
        pretrain=pretrain,
        valid=valid,
        split=split,
        tracking=tracking,
    )


def _options(
    req: JobCreate, inputs: Inputs, output_dir: Path
) -> tuple[PipelineConfig, dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """Stage 2: the pipeline config and each step's section of options (preset < request config <
    hyperparameters, then the files by role and the grader), with what the request set itself and the
    hyperparameters as the job shows them."""
    method, steps = inputs.method, inputs.steps
    train, pref, prompts, pretrain = inputs.train, inputs.pref, inputs.prompts, inputs.pretrain
    top, sections, explicit, shown_hp = _step_sections(req, method, inputs.hp, steps, inputs.tracking)
    data = [train.path] if train else list(DataConfig().data)
    top = {**top, "data": data, "data_split": inputs.split}
    if inputs.valid is not None:  # OpenAI's validation_file: every step evaluates on it
        top["eval_data"] = [inputs.valid.path]
    if req.seed is not None:
        top["seed"] = req.seed
    if method == "dpo" and 1 not in steps:  # OpenAI's dpo: the given model is the policy (and reference)
        sections["dpo"]["model_name_or_path"] = str(inputs.actor.path)
    if pref is not None:
        sections["dpo" if method == "dpo" else "reward"] |= {"data": [pref.path], "data_split": "0,10,0"}
        if prompts is None:
            sections["ppo"] |= {"data": [pref.path], "data_split": "0,0,10"}
    if prompts is not None:
        sections["ppo"] |= {"data": [prompts.path], "data_split": "0,0,10"}
    if pretrain is not None:
        sections["ppo"] |= {"unsup_data": [pretrain.path]}
        sections["ppo"].setdefault("unsup_coef", 1.0)
    if inputs.grader is not None:
        _graded_sections(sections["ppo"], explicit["ppo"], inputs.grader, steps, inputs.actor, train, prompts)
    if (shape := _response_format(req)) is not None:
        sections["ppo"]["response_format"] = shape
    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    pipeline_fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(top) - pipeline_fields - data_fields)
    if unknown:
        raise InvalidRequestError(f"preset: unknown options {', '.join(unknown)}", param="preset")
    try:
        cfg = PipelineConfig(
            actor_model=str(inputs.actor.path),
            reward_model=str(inputs.reward.path) if inputs.reward else "",
            output_dir=str(output_dir),
            method=RUNS[RUN_OF_METHOD[method]].table,
            step=steps,
            data=DataConfig(**{k: v for k, v in top.items() if k in data_fields}),
            **{k: v for k, v in top.items() if k in pipeline_fields and k != "data"},
        )
    except (ValueError, TypeError) as e:
        raise from_value_error(ValueError(str(e))) from None
    return cfg, sections, explicit, shown_hp


def _plan_steps(
    req: JobCreate,
    inputs: Inputs,
    cfg: PipelineConfig,
    sections: dict[str, dict[str, Any]],
    explicit: dict[str, dict[str, Any]],
    settings: Settings,
    shown_hp: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Stages 3 and 4, per step: its config built (the engine's own dataclass checks it), the server's
    limits and a full first batch checked, its memory planned (re-planned when `memory: auto`)."""
    import argparse

    from rlhf_engine.config.args import dataclass_from_args
    from rlhf_engine.config.pipeline import step_values

    actor, reward = inputs.actor, inputs.reward
    table = step_table(inputs.method)
    shapes = Shapes(
        actor=shape_of(actor.path, model_params(actor.path), "actor"),
        reward=shape_of(reward.path, model_params(reward.path), "reward model") if reward else None,
    )
    plan: dict[str, Any] = {}
    memory: list[dict[str, Any]] = []
    resolved: dict[str, Any] = {}
    processes, actor_b = req.num_gpus, model_params(actor.path)
    try:
        for step in inputs.steps:
            sec, cls = table[step].command, table[step].config
            values = step_values(cfg, step, sections[sec])
            built: Any = dataclass_from_args(cls, argparse.Namespace(), file_values=values)
            targets = hyper.step_targets(
                inputs.hp,
                step=step,
                cls=cls,
                section=sections[sec],
                rows=_train_rows_at_most(built.data, step, inputs.data_files),
                processes=processes,
                actor_params_b=actor_b,
                has_validation=inputs.valid is not None,
                validation_rows=inputs.valid.rows if inputs.valid is not None else None,
            )
            values |= targets
            built = dataclass_from_args(cls, argparse.Namespace(), file_values=values)
            built, mem = plan_step_memory(
                step=step,
                command=sec,
                built=built,
                values=values,
                # the memory planner keeps what the hyperparameters set, but may re-shape a batch_size
                # into other micro-batches × accumulation (the same examples per step)
                explicit=explicit[sec]
                | {k: v for k, v in targets.items() if k not in hyper.HP_OPTIONS["batch_size"]},
                shapes=shapes,
                gpu_type=req.gpu_type,
                num_gpus=req.num_gpus,
                nodes=req.nodes,
                mode=req.memory,
                config_class=table[step].config,
                gpu_memory=settings.gpu_memory_gib,
            )
            memory.append(mem)
            _check_limits(built, sec, settings)
            _check_fills_a_batch(built, step, sec, inputs.data_files, req.num_gpus)
            plan[str(step)] = values
            if step == inputs.steps[-1]:  # the step whose model is the job's: its values are the job's
                resolved = hyper.resolved(built, step=step, cls=cls, processes=processes, method_hp=shown_hp)
    except InvalidRequestError:
        raise
    except (ValueError, TypeError) as e:
        raise from_value_error(ValueError(str(e))) from None
    return plan, memory, resolved


def _step_sections(
    req: JobCreate, method: str, hp: Hyperparameters | None, steps: list[int], tracking: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, Any]]:
    """preset < request config < hyperparameters: (top-level values, each step's section, what the request
    set itself, the hyperparameters as the job shows them). A preset is a shipped name, never a path."""
    if req.preset is not None and req.preset not in presets():
        raise InvalidRequestError(
            f"preset: {req.preset!r} is not one of {', '.join(presets())}", param="preset"
        )
    top, sections = load_pipeline_file(req.preset) if req.preset else ({}, _no_sections())
    explicit = req.config.model_dump() if req.config else _no_sections()
    for sec in SECTIONS:
        for forbidden in (
            "output_dir",
            "model_name_or_path",
            "actor_model_name_or_path",
            "critic_model_name_or_path",
            "reward_model_name_or_path",
            "reference_model_name_or_path",
            "data",
            "unsup_data",
            "overwrite",
            "resume",
        ):
            if forbidden in explicit[sec]:
                raise InvalidRequestError(
                    f"config.{sec}.{forbidden}: set by the job itself (model, files, output); remove it",
                    param=f"config.{sec}.{forbidden}",
                )
        sections[sec] = {
            "enable_tensorboard": True,
            **tracking,
            **sections[sec],
            **explicit[sec],
        }  # TensorBoard: always
    shown_hp = _apply_hyperparameters(hp, explicit, steps, method)
    return top, sections, explicit, shown_hp


def _graded_sections(
    ppo: dict[str, Any],
    explicit: dict[str, Any],
    grader: dict[str, Any],
    steps: list[int],
    actor: models_svc.ModelRef,
    train: File | None,
    prompts: File | None,
) -> None:
    """Step 3's options for a grader job: the grader as the reward, GRPO unless config.ppo says rloo, and
    the prompts (prompt_file, else the training file, else bundled:questions); the rows are checked to
    carry every field the grader reads."""
    import json

    algorithm = ppo.setdefault("algorithm", "grpo")
    if algorithm == "ppo":
        raise InvalidRequestError(
            "config.ppo.algorithm: ppo needs a critic, which a grader job does not train; use grpo "
            "or rloo, or drop the grader and give reward_model for RLHF",
            param="config.ppo.algorithm",
        )
    if "samples_per_prompt" not in explicit:  # as many answers per step as the preset's PPO: G per prompt
        ppo["samples_per_prompt"] = group = 4
        if "per_device_generation_batch_size" not in explicit and "per_device_generation_batch_size" in ppo:
            ppo["per_device_generation_batch_size"] = max(1, ppo["per_device_generation_batch_size"] // group)
    ppo |= {
        "grader": json.dumps(grader, sort_keys=True),
        "critic_model_name_or_path": "",
        "reward_model_name_or_path": "",
    }
    if 1 not in steps:
        ppo["actor_model_name_or_path"] = str(actor.path)
    source = prompts or (train if train is not None and train.kind != "sft" else None)
    data = [source.path] if source is not None else ["bundled:questions"]
    ppo.setdefault("data", data)
    if source is None or source.kind == "prompt":
        ppo.setdefault("data_split", "0,0,10")
    _check_grader_rows(grader, ppo["data"])


def _check_grader_rows(grader: dict[str, Any], paths: list[str]) -> None:
    """Every prompt row carries the fields the grader's templates read: a 400 now, not a failed job later."""
    from rlhf_engine import graders
    from rlhf_engine.data.readers import read_dataset

    parsed = graders.parse(grader, "method.reinforcement.grader")
    if not parsed.item_fields():
        return
    for path in paths:
        ds = read_dataset(path)
        for row in [*ds.rows, *(ds.eval_rows or [])]:
            try:
                graders.check_row(parsed, row.item or {}, where="method.reinforcement.grader")
            except graders.GraderError as e:
                raise InvalidRequestError(f"{e} (row {row.line} of the prompts)", param=e.param) from None


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
            d = server_data(path)
            rows, kind, own_eval = d.rows, d.kind, d.own_eval
            if kind is None:
                return None
        held_out = 0.0 if data.eval_data else data.eval_fraction  # a validation file: nothing held out
        n_eval = 0 if own_eval else round(rows * held_out)
        n_eval = max(1, n_eval) if not own_eval and held_out > 0 and rows >= 2 else n_eval
        train = rows - n_eval
        if kind in ("sft", "prompt"):  # SFT rows feed step 1 only, prompt-only rows step 3 only
            got = train if step == (1 if kind == "sft" else 3) else 0
        else:
            cuts = bounds(train, data.shares)
            got = cuts[step] - cuts[step - 1]
        total += got * weight
    return int(total)


def _check_fills_a_batch(built: Any, step: int, sec: str, files: list[File], num_gpus: int) -> None:
    """A step whose data cannot fill one global batch is refused at submit, not after the queue, the
    model build and the tokenisation (the step itself would stop with the same numbers)."""
    rows = _train_rows_at_most(built.data, step, files)
    if rows is None:
        return
    need, what = built.batch_rows(num_gpus)  # the step's own count, with num_gpus processes
    fix = f"config.{sec}." + (
        "per_device_train_batch_size or gradient_accumulation_steps"
        if step < 3
        else "per_device_generation_batch_size"
    )
    if rows < need:
        raise InvalidRequestError(
            f"config.{sec}: step {step} gets at most {rows} training rows of its data (data_split "
            f"{built.data.data_split}, eval_fraction {built.data.eval_fraction}), fewer than one "
            f"batch: {what}; lower {fix}, or give more data",
            param=f"config.{sec}",
        )


def _check_limits(built: Any, sec: str, settings: Settings) -> None:
    if built.data.max_seq_len > settings.max_seq_len:
        raise InvalidRequestError(
            f"config.{sec}.max_seq_len: {built.data.max_seq_len} is above this server's "
            f"limit of {settings.max_seq_len}",
            param=f"config.{sec}.max_seq_len",
        )
    if built.max_steps > settings.max_steps_per_stage:
        raise InvalidRequestError(
            f"config.{sec}.max_steps: above this server's limit of {settings.max_steps_per_stage}",
            param=f"config.{sec}.max_steps",
        )


def estimate(*, session: Session, tenant: str, req: EstimateRequest, settings: Settings) -> dict[str, Any]:
    sizes = {"tokens", "model_parameters", "reward_model_parameters"}
    body = req.model_dump(exclude=sizes, exclude_unset=True)
    job_req = JobCreate(**body)
    _check_nodes(job_req, settings)
    req.num_gpus = job_req.num_gpus
    method, _ = _method(job_req)
    steps = _steps(job_req, method) if _grader(job_req) is None else _graded_steps(job_req, None)
    if req.model_parameters or req.tokens:  # planning for a model / data not on this server
        _check_gpu_type(req.gpu_type, settings)
        for name, count in (req.tokens or {}).items():
            if name not in ("1", "2", "3") or count < 0:
                raise InvalidRequestError(
                    f"tokens: {name!r}: {count} must be a step (1, 2 or 3) and a count of at least "
                    "0 tokens, e.g. {'3': 135000000}",
                    param="tokens",
                )
        actor_p = (req.model_parameters or 1e9) / 1e9
        reward_p = (req.reward_model_parameters or 3.5e8) / 1e9
        plan: dict[str, Any] = {str(s): {} for s in steps}
        est = estimate_steps(
            plan=plan,
            steps=steps,
            method=method,
            files=[],
            actor_params=actor_p,
            reward_params=reward_p,
            gpu_type=req.gpu_type,
            num_gpus=req.num_gpus,
            tokens_override=req.tokens,
        )
        memory = _memory_by_size(job_req, method, steps, actor_p, reward_p, settings)
    else:
        try:
            planned = make_plan(
                session=session,
                tenant=tenant,
                req=job_req,
                settings=settings,
                output_dir=settings.runs_dir / tenant / "estimate",
            )  # planned only, never written
        except InvalidRequestError as e:
            if e.param in (
                "model",
                "reward_model",
            ):  # a model not on this server can still be planned by size
                e.message += (
                    f"; to estimate a model that is not here, give its size: "
                    f"{'model_parameters' if e.param == 'model' else 'reward_model_parameters'}"
                )
            raise
        est, memory = planned.estimate, planned.memory
    seconds = sum(s.seconds for s in est)
    usd = sum(s.usd for s in est)
    return {
        "seconds": seconds,
        "hours": seconds / 3600,
        "usd": usd,
        "gpu_type": req.gpu_type,
        "num_gpus": req.num_gpus,
        "nodes": req.nodes,
        "price_per_gpu_hour": costs.price(req.gpu_type),
        "steps": [StepEstimate(step=s.step, tokens=s.tokens, seconds=s.seconds, usd=s.usd) for s in est],
        "memory": memory,
    }


def _memory_by_size(
    req: JobCreate, method: str, steps: list[int], actor_b: float, reward_b: float, settings: Settings
) -> list[dict[str, Any]]:
    """Memory plans for models given by size (not on this server): the preset's and the request's options."""
    from rlhf_engine import planner as pl

    hp = _method(req)[1]
    top, sections, explicit, _ = _step_sections(req, method, hp, steps, {})
    for step in steps:
        sec, cls = step_table(method)[step].command, step_table(method)[step].config
        sections[sec] |= hyper.step_targets(
            hp,
            step=step,
            cls=cls,
            section=sections[sec],
            rows=None,
            processes=req.num_gpus,
            actor_params_b=actor_b,
            has_validation=False,
            validation_rows=None,
        )
    graded = _grader(req) is not None
    name = "grpo" if graded else RUN_OF_METHOD[method]
    shapes = Shapes(
        actor=pl.Shape.from_params(actor_b * 1e9, name="actor"),
        reward=None if graded else pl.Shape.from_params(reward_b * 1e9, name="reward model"),
    )
    try:
        built_steps = pl.step_configs(
            top, sections, method=name, actor="actor", reward="" if graded else "reward"
        )
    except ValueError as e:
        raise from_value_error(e) from None
    out = []
    for step, _, built in built_steps:
        if step not in steps:
            continue
        command = step_table(method)[step].command
        _, mem = plan_step_memory(
            step=step,
            command=command,
            built=built,
            values=None,
            explicit=explicit.get(command, {}),
            shapes=shapes,
            gpu_type=req.gpu_type,
            num_gpus=req.num_gpus,
            nodes=req.nodes,
            mode=req.memory,
            config_class=step_table(method)[step].config,
            gpu_memory=settings.gpu_memory_gib,
        )
        out.append(mem)
    return out
