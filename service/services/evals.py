"""OpenAI's Evals API: evals (an item schema and testing criteria — graders), runs over a data source
(items with samples already made, or sampled now from a model we serve), and each run's output items.

Everything that can be known wrong is a 400 naming the field before anything runs: a schema that is not
a JSON schema, a criterion that cannot work or reads a field the schema lacks, a judge or a sampled
model that does not exist, rows that do not match the schema. Runs execute on an evals worker
(workers/evals.py) under a lease, as jobs do; the database is the record."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from rlhf_engine import graders
from service.db.models import Eval, EvalOutputItem, EvalRun, File, utcnow
from service.errors import InvalidRequestError, NotFoundError, WrongStateError
from service.pagination import newest_first
from service.services import judges
from service.services import models as models_svc
from service.settings import Settings

MAX_CRITERIA = 32
MAX_ROWS = 5000
RUN_STATUSES = ("queued", "in_progress", "completed", "failed", "canceled")
LIVE = ("queued", "in_progress")
SAMPLE_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string"},
        "choices": {"type": "array"},
        "output_text": {"type": "string"},
        "output_json": {},
        "output_tools": {"type": "array"},
    },
    "required": ["output_text"],
}


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


# ---------------------------------------------------------------------------- evals


def _item_schema(config: Any) -> tuple[dict[str, Any], bool]:
    from jsonschema import Draft202012Validator, SchemaError

    if not isinstance(config, dict):
        raise _bad("data_source_config", "must be an object {type: custom, item_schema}")
    kind = config.get("type")
    if kind != "custom":
        raise _bad(
            "data_source_config.type",
            f"{kind!r}: only custom is supported (logs and stored_completions read completions this service "
            "does not store); give {type: custom, item_schema}",
        )
    schema = config.get("item_schema")
    if not isinstance(schema, dict):
        raise _bad("data_source_config.item_schema", "must be a JSON schema object")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise _bad("data_source_config.item_schema", f"is not a JSON schema: {e.message}") from None
    if len(json.dumps(schema)) > 64 * 1024:
        raise _bad("data_source_config.item_schema", "is over 64 KB")
    return schema, bool(config.get("include_sample_schema", False))


def _schema_has(schema: dict[str, Any], path: str) -> bool:
    """Whether the item schema declares `path` (dots through nested objects' properties). A schema that
    declares no properties at some level (free-form) accepts anything below it."""
    node: Any = schema
    for part in path.split("."):
        props = node.get("properties") if isinstance(node, dict) else None
        if props is None:
            return node.get("additionalProperties", True) is not False if isinstance(node, dict) else True
        if part not in props:
            return False
        node = props[part]
    return True


def _criteria(
    given: Any, schema: dict[str, Any], *, session: Session, tenant: str, settings: Settings
) -> list[dict[str, Any]]:
    if not isinstance(given, list) or not 1 <= len(given) <= MAX_CRITERIA:
        raise _bad("testing_criteria", f"give 1 to {MAX_CRITERIA} graders")
    out = []
    names: set[str] = set()
    for i, spec in enumerate(given):
        where = f"testing_criteria[{i}]"
        try:
            grader = graders.parse(spec, where)
        except graders.GraderError as e:
            raise InvalidRequestError(str(e), param=e.param) from None
        if grader.score_models():
            raise _bad(
                f"{where}.input",
                "a score_model without input scores with a reward model inside training jobs; in an eval, "
                "give input messages to prompt a chat model as the judge",
            )
        judges.check_models(session=session, tenant=tenant, grader=grader, settings=settings)
        for field in sorted(grader.item_fields()):
            if not _schema_has(schema, field):
                raise _bad(
                    where,
                    f"reads {{{{item.{field}}}}}, which data_source_config.item_schema does not declare "
                    f"(its properties: {', '.join(sorted(schema.get('properties') or {})) or 'none'})",
                )
        if spec["type"] == "text_similarity" and not isinstance(spec.get("pass_threshold"), int | float):
            raise _bad(f"{where}.pass_threshold", "a text_similarity criterion needs a number to pass at")
        threshold = spec.get("pass_threshold")
        if threshold is not None and (not isinstance(threshold, int | float) or isinstance(threshold, bool)):
            raise _bad(f"{where}.pass_threshold", "must be a number")
        if grader.name in names:
            raise _bad(
                f"{where}.name", f"{grader.name!r} names another criterion too; give each its own name"
            )
        names.add(grader.name)
        out.append({**spec, "name": grader.name})
    return out


def create_eval(*, session: Session, tenant: str, body: dict[str, Any], settings: Settings) -> Eval:
    schema, include_sample = _item_schema(body.get("data_source_config"))
    criteria = _criteria(
        body.get("testing_criteria"), schema, session=session, tenant=tenant, settings=settings
    )
    row = Eval(
        tenant_id=tenant,
        name=body.get("name") or "",
        data_source_config={"type": "custom", "item_schema": schema, "include_sample_schema": include_sample},
        testing_criteria=criteria,
        eval_metadata=body.get("metadata"),
    )
    session.add(row)
    session.flush()
    return row


def get_eval(*, session: Session, tenant: str, eval_id: str) -> Eval:
    row = session.get(Eval, eval_id)
    if row is None or row.tenant_id != tenant:
        raise NotFoundError(f"no eval {eval_id}", param="eval_id")
    return row


def eval_object(row: Eval) -> dict[str, Any]:
    config = row.data_source_config
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"item": config["item_schema"]},
        "required": ["item"],
    }
    if config.get("include_sample_schema"):
        schema["properties"]["sample"] = SAMPLE_SCHEMA
        schema["required"].append("sample")
    return {
        "id": row.id,
        "object": "eval",
        "name": row.name,
        "created_at": int(row.created_at.timestamp()),
        "metadata": row.eval_metadata,
        "data_source_config": {"type": "custom", "schema": schema},
        "testing_criteria": row.testing_criteria,
    }


def list_evals(
    *, session: Session, tenant: str, after: str | None, limit: int, order: str
) -> tuple[list[Eval], bool]:
    return newest_first(
        session,
        select(Eval).where(Eval.tenant_id == tenant),
        Eval,
        after=after,
        find=lambda i: get_eval(session=session, tenant=tenant, eval_id=i),
        what="eval",
        limit=limit,
        oldest_first=order == "asc",
    )


def delete_eval(*, session: Session, tenant: str, eval_id: str) -> None:
    row = get_eval(session=session, tenant=tenant, eval_id=eval_id)
    runs = list(session.scalars(select(EvalRun.id).where(EvalRun.eval_id == row.id)))
    if runs:
        session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id.in_(runs)))
        session.execute(delete(EvalRun).where(EvalRun.id.in_(runs)))
    session.delete(row)


# ---------------------------------------------------------------------------- runs: the data source


def _read_rows(session: Session, tenant: str, source: Any) -> list[dict[str, Any]]:
    """The data source's rows, each {"item": …, "sample"?: …}."""
    where = "data_source.source"
    if not isinstance(source, dict):
        raise _bad(where, "must be {type: file_content, content} or {type: file_id, id}")
    if source.get("type") == "file_content":
        content = source.get("content")
        if not isinstance(content, list) or not content:
            raise _bad(f"{where}.content", "give one or more {item, sample?} rows")
        rows = content
        label = f"{where}.content"
    elif source.get("type") == "file_id":
        f = session.get(File, str(source.get("id")))
        if f is None or f.tenant_id != tenant or f.deleted:
            raise NotFoundError(f"{where}.id: no file {source.get('id')}", param=f"{where}.id")
        rows = []
        with open(f.path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    got = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _bad(f"{where}.id", f"line {n} of the file is not JSON ({e.msg})") from None
                rows.append(got if isinstance(got, dict) and "item" in got else {"item": got})
                if len(rows) > MAX_ROWS:
                    break
        label = f"{where}.id"
    else:
        raise _bad(f"{where}.type", f"{source.get('type')!r}: choose file_content or file_id")
    if len(rows) > MAX_ROWS:
        raise _bad(label, f"has more than {MAX_ROWS} rows; split it into several runs")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("item"), dict):
            raise _bad(f"{label}[{i}].item", "must be an object (the row's fields)")
    return rows


def _check_rows(rows: list[dict[str, Any]], schema: dict[str, Any], label: str) -> None:
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)
    for i, r in enumerate(rows):
        error = next(iter(sorted(validator.iter_errors(r["item"]), key=lambda e: list(e.path))), None)
        if error is not None:
            at = ".".join(str(p) for p in error.path)
            field = f"{label}[{i}].item" + (f".{at}" if at else "")
            raise _bad(field, f"{error.message} (data_source_config.item_schema)")


def _messages_template(given: Any, schema: dict[str, Any]) -> dict[str, Any]:
    where = "data_source.input_messages"
    if not isinstance(given, dict):
        raise _bad(
            where, "give {type: template, template: [messages]} or {type: item_reference, item_reference}"
        )
    if given.get("type") == "item_reference":
        ref = given.get("item_reference")
        if not isinstance(ref, str) or not ref.startswith("item.") or not _schema_has(schema, ref[5:]):
            raise _bad(f"{where}.item_reference", f"{ref!r} is not a field of the item schema (item.<field>)")
        return {"type": "item_reference", "item_reference": ref}
    if given.get("type") != "template":
        raise _bad(f"{where}.type", f"{given.get('type')!r}: choose template or item_reference")
    try:  # the same message templates a judge takes
        messages = graders.parse_messages({"input": given.get("template")}, where)
    except graders.GraderError as e:
        raise InvalidRequestError(
            str(e).replace(f"{where}.input", f"{where}.template"),
            param=e.param.replace(f"{where}.input", f"{where}.template"),
        ) from None
    for m in messages:
        for field in m.content.item_fields:
            if not _schema_has(schema, field):
                raise _bad(
                    f"{where}.template", f"reads {{{{item.{field}}}}}, which the item schema does not declare"
                )
        if "sample." in m.content.text:
            raise _bad(f"{where}.template", "reads {{sample.*}}: the sample is what this run makes")
    return {"type": "template", "template": given.get("template")}


def _sampling(given: Any, settings: Settings) -> dict[str, Any]:
    where = "data_source.sampling_params"
    params = given or {}
    if not isinstance(params, dict):
        raise _bad(where, "must be an object")
    out: dict[str, Any] = {}
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 1e-6, 1.0)):
        v = params.get(key)
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or not low <= v <= high):
            raise _bad(f"{where}.{key}", f"must be a number from {low:g} to {high:g}")
        out[key] = v
    tokens = params.get("max_completion_tokens") or params.get("max_completions_tokens")
    if tokens is not None and (not isinstance(tokens, int) or not 1 <= tokens <= settings.chat_max_tokens):
        raise _bad(
            f"{where}.max_completion_tokens", f"must be an integer from 1 to {settings.chat_max_tokens}"
        )
    out["max_completion_tokens"] = tokens or 256
    seed = params.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _bad(f"{where}.seed", "must be an integer")
    out["seed"] = seed
    return out


def _checked_source(
    session: Session,
    tenant: str,
    ev: Eval,
    source: dict[str, Any],
    settings: Settings,
    *,
    model_known: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run's data source checked whole (the rows against the item schema, the model, the templates):
    what the run stores, and its rows. `model_known=False`: a job's eval, whose model comes later."""
    kind = source.get("type")
    if kind == "responses":
        raise _bad(
            "data_source.type",
            "responses runs read stored Responses, which this service does not keep; use completions (a "
            "model sampled now) or jsonl (samples you made)",
        )
    if kind not in ("jsonl", "completions"):
        raise _bad("data_source.type", f"{kind!r}: choose jsonl or completions")
    schema = ev.data_source_config["item_schema"]
    rows = _read_rows(session, tenant, source.get("source"))
    label = "data_source.source." + ("content" if source["source"]["type"] == "file_content" else "id")
    _check_rows(rows, schema, label)
    stored: dict[str, Any] = {"type": kind, "source": source["source"]}
    if kind == "completions":
        model = source.get("model")
        if model_known:
            if not isinstance(model, str) or not model:
                raise _bad("data_source.model", "name a model of GET /v1/models to sample")
            ref = models_svc.resolve(
                session=session,
                tenant=tenant,
                name=model,
                models_dir=settings.models_dir,
                param="data_source.model",
            )
            if judges.is_reward_model(ref.path):
                raise _bad("data_source.model", f"{model} is a reward model (a value head): it cannot answer")
        stored |= {
            "model": model,
            "input_messages": _messages_template(source.get("input_messages"), schema),
            "sampling_params": _sampling(source.get("sampling_params"), settings),
        }
        if stored["input_messages"]["type"] == "item_reference":
            path = stored["input_messages"]["item_reference"][5:]
            for i, r in enumerate(rows):
                got = item_path(r["item"], path)
                if not isinstance(got, list) or not got:
                    raise _bad(f"{label}[{i}].item.{path}", "must be a list of messages to send")
    else:
        reads_sample = any("sample." in json.dumps(c) for c in ev.testing_criteria)
        for i, r in enumerate(rows):
            if reads_sample and sample_text(r.get("sample")) is None:
                raise _bad(
                    f"{label}[{i}].sample",
                    "the criteria read {{sample.*}}: give each row a sample ({output_text} or an OpenAI "
                    "completion's {choices}), or make a completions run that samples a model",
                )
    return stored, rows


def _new_run(ev: Eval, tenant: str, stored: dict[str, Any], rows: int, **fields: Any) -> EvalRun:
    return EvalRun(
        eval_id=ev.id,
        tenant_id=tenant,
        status="queued",
        model=stored.get("model"),
        data_source=stored,
        rows=rows,
        result_counts={"total": rows, "errored": 0, "failed": 0, "passed": 0},
        per_criteria=[{"testing_criteria": c["name"], "passed": 0, "failed": 0} for c in ev.testing_criteria],
        usage={},
        **fields,
    )


def create_run(
    *, session: Session, tenant: str, eval_id: str, body: dict[str, Any], settings: Settings
) -> EvalRun:
    ev = get_eval(session=session, tenant=tenant, eval_id=eval_id)
    source = body.get("data_source")
    if not isinstance(source, dict):
        raise _bad(
            "data_source", "give {type: jsonl, source} or {type: completions, model, input_messages, source}"
        )
    stored, rows = _checked_source(session, tenant, ev, source, settings)
    model = stored.get("model")
    run = _new_run(
        ev,
        tenant,
        stored,
        len(rows),
        name=body.get("name") or (f"{model} on {ev.name}" if model else ev.name),
        run_metadata=body.get("metadata"),
    )
    session.add(run)
    session.flush()
    return run


def check_job_evals(
    *, session: Session, tenant: str, given: list[dict[str, Any]], settings: Settings
) -> None:
    """A job's `evals`, checked at submit as a run of each would be (400 naming the field): the eval is
    the tenant's, its data source a completions source (its model is the job's, filled in later)."""
    for i, e in enumerate(given):
        where = f"evals[{i}]"
        try:
            ev = get_eval(session=session, tenant=tenant, eval_id=e["eval_id"])
        except NotFoundError:
            raise _bad(f"{where}.eval_id", f"no eval {e['eval_id']} of yours (see GET /v1/evals)") from None
        source = {"type": "completions", **{k: v for k, v in e["data_source"].items() if k != "model"}}
        try:
            _checked_source(session, tenant, ev, source, settings, model_known=False)
        except (InvalidRequestError, NotFoundError) as err:
            param = f"{where}.{err.param}" if err.param else where
            raise InvalidRequestError(f"{where}.{err.message}", param=param) from None


def job_runs(
    *, session: Session, job: Any, model: str, every: tuple[str, ...], label: str, settings: Settings
) -> list[str]:
    """Queue the job's evals (those whose `every` is in `every`) on `model`, once per (job, eval, model):
    ingesting a checkpoint twice queues nothing new. The run ids, to enqueue after the commit."""
    out = []
    for e in (job.request or {}).get("evals") or []:
        if e.get("every", "final") not in every:
            continue
        ev = session.get(Eval, e["eval_id"])
        exists = session.scalar(
            select(EvalRun.id).where(
                EvalRun.job_id == job.id, EvalRun.eval_id == e["eval_id"], EvalRun.model == model
            )
        )
        if ev is None or exists is not None:  # (an eval deleted since: nothing to run)
            continue
        given = {k: v for k, v in e["data_source"].items() if k != "model"}
        stored = {
            "type": "completions",
            "source": given["source"],
            "model": model,
            "input_messages": _messages_template(
                given.get("input_messages"), ev.data_source_config["item_schema"]
            ),
            "sampling_params": _sampling(given.get("sampling_params"), settings),
        }
        rows = _read_rows(session, job.tenant_id, stored["source"])
        run = _new_run(
            ev,
            job.tenant_id,
            stored,
            len(rows),
            job_id=job.id,
            name=label,
        )
        session.add(run)
        session.flush()
        out.append(run.id)
    return out


def item_path(item: Any, path: str) -> Any:
    got = item
    for part in path.split("."):
        if not isinstance(got, dict):
            return None
        got = got.get(part)
    return got


def sample_text(sample: Any) -> str | None:
    """A given sample's answer: `output_text`, or an OpenAI completion's first choice."""
    if not isinstance(sample, dict):
        return None
    if isinstance(sample.get("output_text"), str):
        return str(sample["output_text"])
    choices = sample.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        if isinstance(message.get("content"), str):
            return str(message["content"])
    output = sample.get("output")
    if (
        isinstance(output, list)
        and output
        and isinstance(output[0], dict)
        and isinstance(output[0].get("content"), str)
    ):
        return str(output[0]["content"])
    return None


def rows_of(session: Session, run: EvalRun) -> list[dict[str, Any]]:
    """A run's rows again (the worker reads them as the run was created)."""
    return _read_rows(session, run.tenant_id, run.data_source["source"])


# ---------------------------------------------------------------------------- runs: reading


# ---------------------------------------------------------------------------- runs: their states (this module
# is the one place an eval run's status changes, as service/jobs/lifecycle.py is for jobs)


def claim_run(*, session: Session, run_id: str, owner: str, lease_s: float) -> bool:
    """Take a run's lease: it is queued or running, and nobody holds a live lease on it."""
    now = utcnow()
    got = session.execute(
        update(EvalRun)
        .where(
            EvalRun.id == run_id,
            EvalRun.status.in_(LIVE),
            or_(EvalRun.lease_owner.is_(None), EvalRun.lease_until < now),
        )
        .values(
            lease_owner=owner,
            lease_until=now + timedelta(seconds=lease_s),
            attempts=EvalRun.attempts + 1,
            status="in_progress",
        )
    )
    claimed = bool(getattr(got, "rowcount", 0))
    if claimed:
        run = session.get(EvalRun, run_id, populate_existing=True)
        assert run is not None
        run.started_at = run.started_at or now
    return claimed


def end_run(run: EvalRun, status: str, error: dict[str, Any] | None = None) -> None:
    """A run's last state (completed, failed, canceled); its lease and any cancel request cleared."""
    assert status in ("completed", "failed", "canceled")
    run.status, run.finished_at, run.error = status, utcnow(), error
    run.lease_owner = run.lease_until = run.control = None


def get_run(*, session: Session, tenant: str, eval_id: str, run_id: str) -> EvalRun:
    run = session.get(EvalRun, run_id)
    if run is None or run.tenant_id != tenant or run.eval_id != eval_id:
        raise NotFoundError(f"no run {run_id} of eval {eval_id}", param="run_id")
    return run


def run_object(run: EvalRun) -> dict[str, Any]:
    usage = [
        {
            "model_name": model,
            "invocation_count": u.get("calls", 0),
            "prompt_tokens": u.get("prompt_tokens", 0),
            "completion_tokens": u.get("completion_tokens", 0),
            "total_tokens": u.get("prompt_tokens", 0) + u.get("completion_tokens", 0),
            "cached_tokens": 0,
        }
        for model, u in sorted((run.usage or {}).items())
    ]
    return {
        "id": run.id,
        "object": "eval.run",
        "eval_id": run.eval_id,
        "name": run.name,
        "status": run.status,
        "model": run.model or "",
        "data_source": run.data_source,
        "result_counts": run.result_counts,
        "per_testing_criteria_results": run.per_criteria,
        "per_model_usage": usage,
        "report_url": f"/ui/#/evals/{run.eval_id}",  # the console's page of the eval: its runs side by side
        "error": run.error,
        "created_at": int(run.created_at.timestamp()),
        "metadata": run.run_metadata if run.job_id is None else {"job_id": run.job_id},
    }


def list_runs(
    *,
    session: Session,
    tenant: str,
    eval_id: str,
    after: str | None,
    limit: int,
    order: str,
    status: str | None,
) -> tuple[list[EvalRun], bool]:
    get_eval(session=session, tenant=tenant, eval_id=eval_id)
    q = select(EvalRun).where(EvalRun.eval_id == eval_id, EvalRun.tenant_id == tenant)
    if status is not None:
        if status not in RUN_STATUSES:
            raise _bad("status", f"{status!r}: choose {', '.join(RUN_STATUSES)}")
        q = q.where(EvalRun.status == status)
    return newest_first(
        session,
        q,
        EvalRun,
        after=after,
        find=lambda i: get_run(session=session, tenant=tenant, eval_id=eval_id, run_id=i),
        what="run",
        limit=limit,
        oldest_first=order == "asc",
    )


def cancel_run(*, session: Session, tenant: str, eval_id: str, run_id: str) -> EvalRun:
    run = get_run(session=session, tenant=tenant, eval_id=eval_id, run_id=run_id)
    if run.status not in LIVE:
        raise WrongStateError(f"run {run_id} is {run.status}; only a queued or running run can be canceled")
    if run.status == "queued" and run.lease_owner is None:
        end_run(run, "canceled")
    else:
        run.control = "cancel"  # the worker holding it stops at its next batch
    return run


def delete_run(*, session: Session, tenant: str, eval_id: str, run_id: str) -> None:
    run = get_run(session=session, tenant=tenant, eval_id=eval_id, run_id=run_id)
    if run.status in LIVE:
        raise WrongStateError(f"run {run_id} is {run.status}; cancel it before deleting it")
    session.execute(delete(EvalOutputItem).where(EvalOutputItem.run_id == run.id))
    session.delete(run)


def output_item_object(item: EvalOutputItem, run: EvalRun) -> dict[str, Any]:
    return {
        "id": item.id,
        "object": "eval.run.output_item",
        "run_id": item.run_id,
        "eval_id": run.eval_id,
        "status": item.status,
        "datasource_item_id": item.item_index,
        "datasource_item": item.datasource_item,
        "results": item.results,
        "sample": item.sample,
        "created_at": int(item.created_at.timestamp()),
    }


def list_output_items(
    *, session: Session, run: EvalRun, after: str | None, limit: int, order: str, status: str | None
) -> tuple[list[EvalOutputItem], bool]:
    q = select(EvalOutputItem).where(EvalOutputItem.run_id == run.id)
    if status is not None:
        if status not in ("pass", "fail"):
            raise _bad("status", f"{status!r}: choose pass or fail")
        q = q.where(EvalOutputItem.status == status)
    if after:
        anchor = session.scalar(
            select(EvalOutputItem).where(EvalOutputItem.id == after, EvalOutputItem.run_id == run.id)
        )
        if anchor is None:
            raise NotFoundError(f"after: no output item {after} in run {run.id}", param="after")
        q = q.where(EvalOutputItem.seq > anchor.seq if order == "asc" else EvalOutputItem.seq < anchor.seq)
    q = q.order_by(EvalOutputItem.seq if order == "asc" else EvalOutputItem.seq.desc())
    rows = list(session.scalars(q.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def get_output_item(*, session: Session, run: EvalRun, item_id: str) -> EvalOutputItem:
    item = session.scalar(
        select(EvalOutputItem).where(EvalOutputItem.id == item_id, EvalOutputItem.run_id == run.id)
    )
    if item is None:
        raise NotFoundError(f"no output item {item_id} in run {run.id}", param="output_item_id")
    return item


def tally(session: Session, run: EvalRun, criteria: list[dict[str, Any]]) -> None:
    """The run's counts from its output items (the record, so a resumed run counts each item once)."""
    items = list(session.scalars(select(EvalOutputItem).where(EvalOutputItem.run_id == run.id)))
    errored = sum(1 for i in items if (i.sample or {}).get("error"))
    passed = sum(1 for i in items if i.status == "pass")
    run.result_counts = {
        "total": run.rows,
        "errored": errored,
        "failed": len(items) - passed - errored,
        "passed": passed,
    }
    per = []
    for c in criteria:
        got = [r for i in items for r in i.results if r["name"] == c["name"]]
        per.append(
            {
                "testing_criteria": c["name"],
                "passed": sum(r["passed"] for r in got),
                "failed": sum(not r["passed"] for r in got),
            }
        )
    run.per_criteria = per


def passes(criterion: dict[str, Any], graded: graders.Graded) -> bool:
    """Whether a criterion passes for one graded item: string_check at 1; label_model at a passing label;
    text_similarity, python and score_model at `pass_threshold` (python: 0.5, score_model: the middle
    of its range when none is given); multi at `pass_threshold`, else a positive score. A flagged sample
    never passes."""
    if graded.errors:
        return False
    kind = criterion["type"]
    if kind in ("string_check", "label_model"):
        return graded.score >= 1.0
    threshold = criterion.get("pass_threshold")
    if threshold is None:
        if kind == "score_model":
            low, high = criterion.get("range") or [0, 1]
            threshold = (low + high) / 2
        elif kind == "python":
            threshold = 0.5
        else:
            return graded.score > 0
    return graded.score >= float(threshold)


def pass_rates(run: EvalRun) -> dict[str, float]:
    """A run's pass rate overall (`pass_rate`) and per criterion (by name)."""
    counts = run.result_counts or {}
    out = {"pass_rate": counts.get("passed", 0) / counts["total"] if counts.get("total") else 0.0}
    for p in run.per_criteria or []:
        graded = p["passed"] + p["failed"]
        out[p["testing_criteria"]] = p["passed"] / graded if graded else 0.0
    return out
