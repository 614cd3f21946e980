"""A team moving from OpenAI fine-tuning: OpenAI's published workflow, driven with the official SDK with
nothing changed but `base_url`, `api_key` and the model name — no `extra_body` anywhere.

Upload training and validation files; a supervised job with suffix, seed, metadata and validation_file;
its metrics events; its results CSV through `files.content`; chat with the model and with a checkpoint;
share the checkpoint with a second tenant (and revoke it); DPO from the fine-tuned model; a reinforcement
job with a string_check grader and OpenAI's reinforcement hyperparameters; pause, resume, cancel; delete
the model. Plus the SDK's own types: our statuses, event types and levels are its `Literal`s.
"""

from __future__ import annotations

import csv
import io
import json
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import BadRequestError, NotFoundError, OpenAI, omit

from tests.service.conftest import Stack, Workers

MODEL = "tiny-opt-xs"  # the e2e stack's base model (only the model name differs from OpenAI's workflow)


def _chat_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    """OpenAI's chat format; every third row is a two-turn conversation whose first answer has weight 0."""
    rows = []
    for i in range(start, start + n):
        turns = [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": f"What is a dog {i}?"},
            {"role": "assistant", "content": "A dog is an animal."},
        ]
        if i % 3 == 0:
            turns[-1]["weight"] = 0  # type: ignore[assignment]
            turns += [
                {"role": "user", "content": "And a cat?"},
                {"role": "assistant", "content": "A cat is an animal too."},
            ]
        rows.append({"messages": turns})
    return rows


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wait(sdk: OpenAI, job_id: str, statuses: tuple[str, ...], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        assert time.monotonic() < deadline, f"{job_id} still {job.status} after {timeout} s"
        time.sleep(1)


def _all_events(sdk: OpenAI, job_id: str) -> list[Any]:
    """Every event, the way OpenAI's cookbook pages them (newest first, `after` the last id)."""
    out: list[Any] = []
    after: str | None = None
    while True:
        page = sdk.fine_tuning.jobs.list_events(job_id, limit=100, after=after or omit)
        out += page.data
        if not page.has_more:
            return out
        after = page.data[-1].id


@pytest.fixture(scope="module")
def port(e2e_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two tenants' SDK clients on the e2e stack, and an inference worker to chat through."""
    workers = Workers(e2e_stack, tmp_path_factory.mktemp("port-inference"))
    workers.start()
    keys = {t: e2e_stack.key(t) for t in ("port-a", "port-b")}
    yield {
        "a": OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=keys["port-a"], timeout=120),
        "b": OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=keys["port-b"], timeout=120),
        "tmp": tmp_path_factory.mktemp("port"),
    }
    workers.stop()


def test_the_sdks_literal_types_hold_our_statuses_event_types_and_levels() -> None:
    """A drift between what we answer and what the pinned SDK's types say fails here."""
    from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
    from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

    from service.jobs.queries import LEVELS
    from service.jobs.results import SDK_KEYS
    from service.jobs.states import JobStatus
    from service.schemas import CheckpointObject, EventObject, FileObject

    def literal(model: Any, name: str) -> set[Any]:
        hint = model.model_fields[name].annotation  # as pydantic resolved it (the SDK's models are pydantic)
        # a Literal, or an Optional of one
        parts = [hint] if typing.get_origin(hint) is typing.Literal else typing.get_args(hint)
        return {v for a in parts if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)}

    # `paused` is ours (OpenAI's API pauses jobs too; this SDK's type does not list it yet)
    assert set(typing.get_args(JobStatus)) - {"paused"} <= literal(FineTuningJob, "status")
    assert literal(EventObject, "level") == literal(FineTuningJobEvent, "level")
    assert set(LEVELS.values()) <= literal(FineTuningJobEvent, "level")
    assert literal(EventObject, "type") == literal(FineTuningJobEvent, "type")
    sdk_purposes = literal(openai.types.FileObject, "purpose")
    assert literal(FileObject, "purpose") - {"evals"} <= sdk_purposes  # evals: an upload purpose in the SDK
    assert set(openai.types.fine_tuning.jobs.fine_tuning_job_checkpoint.Metrics.model_fields) <= set(SDK_KEYS)
    assert set(CheckpointObject.model_fields) >= set(FineTuningJobCheckpoint.model_fields)


def test_openais_fine_tuning_workflow_runs_unchanged(port: dict[str, Any]) -> None:
    sdk, other, tmp = port["a"], port["b"], port["tmp"]

    # --- files: training and validation, OpenAI's chat format (multi-turn rows with weights)
    train = sdk.files.create(file=_jsonl(tmp / "train.jsonl", _chat_rows(60)).open("rb"), purpose="fine-tune")
    valid = sdk.files.create(
        file=_jsonl(tmp / "valid.jsonl", _chat_rows(12, 100)).open("rb"), purpose="fine-tune"
    )
    assert train.purpose == "fine-tune" and train.status == "processed"
    assert [f.id for f in sdk.files.list(purpose="fine-tune", order="asc")][-2:] == [train.id, valid.id]

    # --- a supervised job as OpenAI's guide writes it
    job = sdk.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        validation_file=valid.id,
        suffix="port",
        seed=7,
        metadata={"team": "port", "run": "sft"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.status == "queued" and job.validation_file == valid.id and job.seed == 7
    assert job.hyperparameters.batch_size == "auto"  # as given, until it starts
    listed = sdk.fine_tuning.jobs.list(metadata={"team": "port"})
    assert [j.id for j in listed.data] == [job.id]
    assert not sdk.fine_tuning.jobs.list(metadata={"team": "nobody"}).data
    done = _wait(sdk, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.batch_size == 1  # resolved: 0.2% of 60
    assert done.fine_tuned_model == f"ft:{MODEL}:port:{job.id}"

    # --- events: metrics events newest first, with the SDK's keys; validation at eval points and at the end
    events = _all_events(sdk, job.id)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    metrics = [e.data for e in events if e.type == "metrics"]
    steps = sorted(m["step"] for m in metrics)
    assert steps == list(range(1, 121))  # 2 epochs × 60 rows, batch 1
    assert all({"train_loss", "train_mean_token_accuracy", "total_steps"} <= set(m) for m in metrics)
    validated = sorted(m["step"] for m in metrics if "valid_loss" in m)
    assert validated == list(range(12, 120, 12))  # about ten evaluations (every 120 // 10 steps)
    last = next(m for m in metrics if m["step"] == 120)
    assert {"full_valid_loss", "full_valid_mean_token_accuracy"} <= set(last)
    first_valid = next(m for m in metrics if m["step"] == validated[0])
    assert last["full_valid_loss"] < first_valid["valid_loss"]  # it learned: validation loss fell
    assert {e.level for e in events} <= {"info", "warn", "error"}

    # --- the results CSV, read the SDK's way
    assert len(done.result_files) == 1
    text = sdk.files.content(done.result_files[0]).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert text.startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    assert [int(r["step"]) for r in rows] == list(range(1, 121))
    assert rows[11]["valid_loss"] and not rows[10]["valid_loss"]
    assert sdk.files.retrieve(done.result_files[0]).purpose == "fine-tune-results"

    # --- checkpoints are models: the SDK's metric names, chat with one
    ckpts = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [120, 100]
    ckpt = ckpts[1]
    assert ckpt.fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-100"
    assert ckpt.metrics.train_loss is not None and ckpt.metrics.step == 100
    assert ckpts[0].metrics.full_valid_loss is not None
    question = [{"role": "user", "content": "What is a dog 5?"}]
    for model in (done.fine_tuned_model, ckpt.fine_tuned_model_checkpoint):
        reply = sdk.chat.completions.create(model=model, messages=question, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content and reply.model == model

    # --- share the checkpoint with another tenant: it chats with it and may train from it, sees nothing else
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=ckpt.fine_tuned_model_checkpoint, messages=question, max_tokens=4)
    granted = sdk.fine_tuning.checkpoints.permissions.create(
        ckpt.fine_tuned_model_checkpoint, project_ids=["port-b"]
    )
    assert [p.project_id for p in granted.data] == ["port-b"]
    assert other.chat.completions.create(
        model=ckpt.fine_tuned_model_checkpoint,
        messages=question,
        max_tokens=4,
    ).choices
    assert ckpt.fine_tuned_model_checkpoint in [m.id for m in other.models.list()]
    with pytest.raises(NotFoundError):
        other.fine_tuning.jobs.checkpoints.list(job.id)  # the owner's job stays theirs
    with pytest.raises(NotFoundError):
        other.fine_tuning.checkpoints.permissions.list(ckpt.fine_tuned_model_checkpoint)
    borrowed = other.fine_tuning.jobs.create(
        model=ckpt.fine_tuned_model_checkpoint, training_file=_upload(other, tmp)
    )
    assert other.fine_tuning.jobs.cancel(borrowed.id).status == "cancelled"
    with pytest.raises(BadRequestError) as refused:  # while shared, the model is not deleted
        sdk.models.delete(done.fine_tuned_model)
    assert refused.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(BadRequestError):
        sdk.fine_tuning.checkpoints.permissions.create(
            ckpt.fine_tuned_model_checkpoint, project_ids=["nobody"]
        )
    shares = sdk.fine_tuning.checkpoints.permissions.list(ckpt.fine_tuned_model_checkpoint).data
    assert [s.id for s in shares] == [granted.data[0].id]
    sdk.fine_tuning.checkpoints.permissions.delete(
        shares[0].id, fine_tuned_model_checkpoint=ckpt.fine_tuned_model_checkpoint
    )
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=ckpt.fine_tuned_model_checkpoint, messages=question, max_tokens=4)

    # --- DPO from the fine-tuned model, OpenAI's preference format: DPO only, on every pair
    pairs = [
        {
            "input": {"messages": [{"role": "user", "content": f"What is a dog {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": "A dog is an animal."}],
            "non_preferred_output": [{"role": "assistant", "content": "Blue."}],
        }
        for i in range(24)
    ]
    pref = sdk.files.create(file=_jsonl(tmp / "pref.jsonl", pairs).open("rb"), purpose="fine-tune")
    dpo = sdk.fine_tuning.jobs.create(
        model=done.fine_tuned_model,
        training_file=pref.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 1, "batch_size": 4}}},
    )
    dpo_done = _wait(sdk, dpo.id, ("succeeded", "failed", "cancelled"))
    assert dpo_done.status == "succeeded", dpo_done.error
    assert dpo_done.hyperparameters.batch_size == 4 and dpo_done.fine_tuned_model.startswith(f"ft:{MODEL}::")
    dpo_metrics = [e.data for e in _all_events(sdk, dpo.id) if e.type == "metrics"]
    # every pair but the 10% held out to evaluate (no validation file given): 22 // 4 steps — no SFT step
    # took 40% of them first (method.dpo.sft_first does, DeepSpeed-Chat's order)
    assert len(dpo_metrics) == 22 // 4

    # --- reinforcement with a grader and OpenAI's hyperparameters (validation prompts evaluated)
    def prompts(n: int, start: int = 0) -> list[dict[str, Any]]:
        return [
            {"messages": [{"role": "user", "content": f"Name an animal {i}."}], "reference_answer": "dog"}
            for i in range(start, start + n)
        ]

    rl_train = sdk.files.create(file=_jsonl(tmp / "rl.jsonl", prompts(16)).open("rb"), purpose="fine-tune")
    rl_valid = sdk.files.create(
        file=_jsonl(tmp / "rlv.jsonl", prompts(6, 50)).open("rb"), purpose="fine-tune"
    )
    grader = {
        "type": "string_check",
        "name": "says_dog",
        "operation": "ilike",
        "input": "{{sample.output_text}}",
        "reference": "{{item.reference_answer}}",
    }
    hp = {
        "n_epochs": 1,
        "batch_size": 4,
        "eval_interval": 2,
        "eval_samples": 4,
        "compute_multiplier": 0.5,
        "reasoning_effort": "low",
        "learning_rate_multiplier": "auto",
    }
    rl = sdk.fine_tuning.jobs.create(
        model=MODEL,
        training_file=rl_train.id,
        validation_file=rl_valid.id,
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}},
    )
    rl_done = _wait(sdk, rl.id, ("succeeded", "failed", "cancelled"))
    assert rl_done.status == "succeeded", rl_done.error
    resolved = rl_done.method.reinforcement.hyperparameters
    assert (resolved.eval_interval, resolved.eval_samples, resolved.compute_multiplier) == (2, 4, 0.5)
    rl_metrics = {e.data["step"]: e.data for e in _all_events(sdk, rl.id) if e.type == "metrics"}
    assert sorted(rl_metrics) == [1, 2, 3, 4]  # 16 prompts, 4 per step
    assert "valid_reward_mean" in rl_metrics[2] and "valid_reward_mean" not in rl_metrics[1]
    assert {"reward_mean", "kl_to_ref"} <= set(rl_metrics[1])
    with pytest.raises(BadRequestError) as too_many:
        sdk.fine_tuning.jobs.create(
            model=MODEL,
            training_file=rl_train.id,
            validation_file=rl_valid.id,
            method={
                "type": "reinforcement",
                "reinforcement": {"grader": grader, "hyperparameters": {"eval_samples": 7}},
            },
        )
    assert too_many.value.body["param"].endswith("eval_samples")  # type: ignore[index]

    # --- pause, resume, cancel; a wrong-state request is a 400 the SDK does not retry
    long = sdk.fine_tuning.jobs.create(
        model=MODEL,
        training_file=train.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 25}}},
    )
    _wait(sdk, long.id, ("running",))
    while not [e for e in sdk.fine_tuning.jobs.list_events(long.id, limit=5).data if e.type == "metrics"]:
        time.sleep(0.5)
    sdk.fine_tuning.jobs.pause(long.id)
    assert _wait(sdk, long.id, ("paused", "succeeded", "failed")).status == "paused"
    assert sdk.fine_tuning.jobs.resume(long.id).status == "queued"
    assert sdk.fine_tuning.jobs.cancel(long.id).status == "cancelled"
    started = time.monotonic()
    with pytest.raises(BadRequestError) as wrong:
        sdk.fine_tuning.jobs.cancel(long.id)
    assert time.monotonic() - started < 2 and "already cancelled" in wrong.value.message  # no retries

    # --- delete the fine-tuned model
    assert sdk.models.delete(done.fine_tuned_model).deleted
    with pytest.raises(NotFoundError):
        sdk.models.retrieve(done.fine_tuned_model)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model=done.fine_tuned_model, messages=question, max_tokens=4)


def _upload(client: OpenAI, tmp: Path) -> str:
    return client.files.create(
        file=_jsonl(tmp / "b.jsonl", _chat_rows(20)).open("rb"), purpose="fine-tune"
    ).id
