# The SDK types its payloads as TypedDicts that plain dict literals of ours do not match (invariance):
# mypy: disable-error-code="arg-type,list-item,misc,typeddict-item"
"""OpenAI's Evals API through the official SDK, on the e2e stack: an eval comparing the finished job's SFT
and RLHF models (sampled now through a live inference worker, graded by a string check, a python grader
in the sandbox and a text similarity), a run over samples given in an uploaded file, paging, cancel and
delete, every bad input a 400 naming the field before anything runs, and a run that survives its evals
worker killed with -9 mid-run: resumed by the sweeper, every item graded once."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from service.db.models import EvalOutputItem, EvalRun, FineTunedModel
from service.db.session import session_scope
from tests.service.conftest import (
    EVAL_CRITERIA as CRITERIA,
)
from tests.service.conftest import (
    EVAL_ITEMS as ITEMS,
)
from tests.service.conftest import (
    EVAL_SCHEMA as SCHEMA,
)
from tests.service.conftest import (
    EvalsWorker,
    Stack,
    Workers,
)


@pytest.fixture(scope="module")
def env(
    e2e_stack: Stack, e2e_finished: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("evals")
    workers = Workers(e2e_stack, tmp)
    workers.start()
    evals = EvalsWorker(e2e_stack, tmp)
    evals.start()
    key = e2e_stack.key("e2e")  # the tenant that owns the finished job's models
    yield {
        "sdk": OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=key, timeout=120, max_retries=0),
        "evals": evals,
        "tmp": tmp,
        "model": e2e_finished["job"]["fine_tuned_model"],
    }
    evals.stop()
    workers.stop()


def _done(sdk: OpenAI, eval_id: str, run_id: str, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while (run := sdk.evals.runs.retrieve(run_id, eval_id=eval_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, run
        time.sleep(0.5)
    return run


def _all_items(sdk: OpenAI, eval_id: str, run_id: str, **params: Any) -> list[Any]:
    out: list[Any] = []
    after = None
    while True:
        page = sdk.evals.runs.output_items.list(
            run_id, eval_id=eval_id, limit=2, **({"after": after} if after else {}), **params
        )
        out += page.data
        if not page.has_more:
            return out
        after = page.data[-1].id


def _greedy(path: str, questions: list[str], tokens: int) -> list[str]:
    """The model's own greedy answers, in process (one load): what the worker must have sampled."""
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    with ChatGenerator.load(path, score_replies=False) as engine:
        return [engine.generate([{"role": "user", "content": q}], params).choices[0].text for q in questions]


def _expected(text: str, item: dict[str, str]) -> dict[str, bool]:
    from rapidfuzz import fuzz

    words = text.split()
    return {
        "names it": item["answer"].lower() in text.lower(),
        "a sentence": 2 <= len(words) <= 40,
        "close": fuzz.ratio(text, item["answer"]) / 100 >= 0.2,
    }


def test_an_eval_compares_a_jobs_sft_and_rlhf_models(
    env: dict[str, Any], e2e_stack: Stack, compared_eval: dict[str, Any]
) -> None:
    """The eval (tests/service/conftest.py: `compared_eval`) ran the job's SFT and RLHF models."""
    sdk: OpenAI = env["sdk"]
    ev = sdk.evals.retrieve(compared_eval["eval_id"])
    assert ev.object == "eval" and ev.data_source_config.type == "custom" and ev.name == "kites"
    runs = {
        model: sdk.evals.runs.retrieve(run_id, eval_id=ev.id)
        for model, run_id in compared_eval["runs"].items()
    }
    for which, run in runs.items():
        run = _done(sdk, ev.id, run.id)
        assert run.status == "completed", run.error
        counts = run.result_counts
        assert (
            counts.total == len(ITEMS) == counts.passed + counts.failed + counts.errored
            and counts.errored == 0
        )
        items = _all_items(sdk, ev.id, run.id)
        assert sorted(i.datasource_item_id for i in items) == list(range(len(ITEMS)))
        with session_scope(e2e_stack.settings.db_url) as s:
            path = s.get(FineTunedModel, which).path  # type: ignore[union-attr]
        per = {c["name"]: [0, 0] for c in CRITERIA}
        greedy = _greedy(path, [i["question"] for i in ITEMS], 12)
        for item in items:
            text = item.sample.output[0].content
            source = ITEMS[item.datasource_item_id]
            assert text == greedy[item.datasource_item_id]  # sampled through the worker, greedy
            expected = _expected(text or "", source)
            assert {r.name: r.passed for r in item.results} == expected, (text, item.results)
            assert item.status == ("pass" if all(expected.values()) else "fail")
            for name, ok in expected.items():
                per[name][0 if ok else 1] += 1
        assert {(p.testing_criteria, p.passed, p.failed) for p in run.per_testing_criteria_results} == {
            (n, a, b) for n, (a, b) in per.items()
        }
        assert counts.passed == sum(i.status == "pass" for i in items)
        usage = {u.run_model_name: u for u in run.per_model_usage}[which]
        assert usage.invocation_count == len(ITEMS) and usage.completion_tokens > 0
        passing = _all_items(sdk, ev.id, run.id, status="pass")
        assert {i.id for i in passing} == {i.id for i in items if i.status == "pass"}
    listed = [r.id for r in sdk.evals.runs.list(ev.id, limit=1)]
    assert set(listed) <= {r.id for r in runs.values()}
    every = sdk.evals.runs.list(ev.id, limit=100, order="asc").data
    assert [r.name for r in every] == list(runs)
    assert sdk.evals.update(ev.id, name="kites v2").name == "kites v2"


def test_a_run_over_samples_given_in_a_file(env: dict[str, Any]) -> None:
    sdk: OpenAI = env["sdk"]
    ev = sdk.evals.create(
        name="given",
        data_source_config={"type": "custom", "item_schema": SCHEMA},
        testing_criteria=CRITERIA[:2],
    )
    rows = [
        {"item": ITEMS[0], "sample": {"output_text": "A kite is a toy that flies."}},  # passes both
        {"item": ITEMS[1], "sample": {"output_text": "Sails"}},  # neither
        {
            "item": ITEMS[2],
            "sample": {"choices": [{"message": {"role": "assistant", "content": "A dog barks."}}]},
        },
    ]
    f = env["tmp"] / "given.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    uploaded = sdk.files.create(file=f.open("rb"), purpose="evals")
    run = sdk.evals.runs.create(
        ev.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": uploaded.id}}
    )
    run = _done(sdk, ev.id, run.id)
    assert run.status == "completed" and (run.result_counts.passed, run.result_counts.failed) == (2, 1)
    assert {(p.testing_criteria, p.passed) for p in run.per_testing_criteria_results} == {
        ("names it", 2),
        ("a sentence", 2),
    }
    fail = sdk.evals.runs.output_items.list(run.id, eval_id=ev.id, status="fail").data
    assert [i.datasource_item_id for i in fail] == [1] and fail[0].sample.output[0].content == "Sails"
    one = sdk.evals.runs.output_items.retrieve(fail[0].id, eval_id=ev.id, run_id=run.id)
    assert one.datasource_item == ITEMS[1]
    # deleting: the run, then the eval; either is then not found
    assert sdk.evals.runs.delete(run.id, eval_id=ev.id).deleted
    with pytest.raises(NotFoundError):
        sdk.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert sdk.evals.delete(ev.id).deleted
    with pytest.raises(NotFoundError):
        sdk.evals.retrieve(ev.id)


def test_bad_evals_and_runs_are_400s_naming_the_field_before_anything_runs(
    env: dict[str, Any], e2e_stack: Stack
) -> None:
    sdk: OpenAI = env["sdk"]

    def refused(call: Callable[[], Any], param: str, says: str = "") -> None:
        with pytest.raises(BadRequestError) as e:
            call()
        body: Any = e.value.body
        assert body["param"] == param and says in body["message"], body

    custom = {"type": "custom", "item_schema": SCHEMA}
    refused(
        lambda: sdk.evals.create(
            data_source_config={"type": "custom", "item_schema": {"type": 5}}, testing_criteria=CRITERIA
        ),
        "data_source_config.item_schema",
        "not a JSON schema",
    )
    refused(
        lambda: sdk.evals.create(data_source_config={"type": "logs"}, testing_criteria=CRITERIA),
        "data_source_config.type",
    )
    reads_missing = {**CRITERIA[0], "reference": "{{item.city}}"}
    refused(
        lambda: sdk.evals.create(data_source_config=custom, testing_criteria=[reads_missing]),
        "testing_criteria[0]",
        "item.city",
    )
    no_threshold = {k: v for k, v in CRITERIA[2].items() if k != "pass_threshold"}
    refused(
        lambda: sdk.evals.create(data_source_config=custom, testing_criteria=[no_threshold]),
        "testing_criteria[0].pass_threshold",
    )
    judge = {
        "type": "label_model",
        "name": "j",
        "model": "nope",
        "input": [{"role": "user", "content": "x"}],
        "labels": ["a"],
        "passing_labels": ["a"],
    }
    refused(
        lambda: sdk.evals.create(data_source_config=custom, testing_criteria=[judge]),
        "testing_criteria[0].model",
    )
    ev = sdk.evals.create(data_source_config=custom, testing_criteria=CRITERIA[:1])
    template = {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]}

    def completions(**over: Any) -> Any:
        source = {
            "type": "completions",
            "model": env["model"],
            "input_messages": template,
            "source": {"type": "file_content", "content": [{"item": i} for i in ITEMS]},
        }
        return lambda: sdk.evals.runs.create(ev.id, data_source={**source, **over})

    lacking = {"type": "file_content", "content": [{"item": ITEMS[0]}, {"item": {"question": "?"}}]}
    refused(
        completions(source=lacking), "data_source.source.content[1].item", "'answer' is a required property"
    )
    refused(completions(model="no-such-model"), "data_source.model")
    refused(
        completions(
            input_messages={"type": "template", "template": [{"role": "user", "content": "{{item.topic}}"}]}
        ),
        "data_source.input_messages.template",
        "item.topic",
    )
    refused(completions(sampling_params={"temperature": 5}), "data_source.sampling_params.temperature")
    refused(
        lambda: sdk.evals.runs.create(
            ev.id, data_source={"type": "responses", "source": {"type": "responses"}}
        ),
        "data_source.type",
    )
    no_samples = {"type": "jsonl", "source": {"type": "file_content", "content": [{"item": ITEMS[0]}]}}
    refused(
        lambda: sdk.evals.runs.create(ev.id, data_source=no_samples), "data_source.source.content[0].sample"
    )
    with session_scope(e2e_stack.settings.db_url) as s:
        assert s.query(EvalRun).filter(EvalRun.eval_id == ev.id).count() == 0  # nothing was queued
    other = OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=e2e_stack.key("evals-other"), max_retries=0)
    with pytest.raises(NotFoundError):
        other.evals.retrieve(ev.id)  # another tenant's eval is not found


def test_a_run_survives_its_worker_killed_mid_run_and_a_cancel_ends_one(
    env: dict[str, Any], e2e_stack: Stack
) -> None:
    sdk: OpenAI = env["sdk"]
    slow = {
        "type": "python",
        "name": "slow",
        "source": "import time\ndef grade(sample, item):\n    time.sleep(0.3)\n    return 1.0",
    }
    ev = sdk.evals.create(
        data_source_config={"type": "custom", "item_schema": SCHEMA}, testing_criteria=[slow]
    )
    rows = [{"item": ITEMS[i % 4], "sample": {"output_text": f"answer {i}"}} for i in range(24)]
    run = sdk.evals.runs.create(
        ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows}}
    )
    deadline = time.monotonic() + 120

    def written() -> int:
        with session_scope(e2e_stack.settings.db_url) as s:
            return s.query(EvalOutputItem).filter(EvalOutputItem.run_id == run.id).count()

    while written() < 8:  # the first batch is on record
        assert time.monotonic() < deadline
        time.sleep(0.2)
    worker = env["evals"].procs[0]
    os.killpg(worker.pid, signal.SIGKILL)  # the worst moment: mid-run, a batch in the sandbox
    worker.wait()
    assert written() < 24
    env["evals"].start()
    done = _done(sdk, ev.id, run.id)
    assert done.status == "completed" and done.result_counts.passed == 24
    with session_scope(e2e_stack.settings.db_url) as s:
        items = s.query(EvalOutputItem).filter(EvalOutputItem.run_id == run.id).all()
        assert sorted(i.item_index for i in items) == list(range(24))  # each once
        assert s.get(EvalRun, run.id).attempts == 2  # type: ignore[union-attr]
    # cancel: a long run ends at its next batch, counted as far as it got
    long = sdk.evals.runs.create(
        ev.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": rows * 4}}
    )
    time.sleep(1)
    assert sdk.evals.runs.cancel(long.id, eval_id=ev.id).id == long.id
    ended = _done(sdk, ev.id, long.id)
    assert ended.status == "canceled" and ended.result_counts.passed < 96
    with pytest.raises(BadRequestError):  # a second cancel: the wrong state, a 400
        sdk.evals.runs.cancel(long.id, eval_id=ev.id)


def test_a_job_runs_its_evals_on_each_checkpoint_and_the_best_is_promoted(
    env: dict[str, Any], e2e_stack: Stack
) -> None:
    sdk: OpenAI = env["sdk"]
    http = e2e_stack.client(e2e_stack.key("e2e"))  # jobs with our fields (the SDK's create wants a file)
    ev = sdk.evals.create(
        name="during", data_source_config={"type": "custom", "item_schema": SCHEMA}, testing_criteria=CRITERIA
    )
    source = {
        "input_messages": {
            "type": "template",
            "template": [{"role": "user", "content": "{{item.question}}"}],
        },
        "sampling_params": {"temperature": 0, "max_completion_tokens": 8},
        "source": {"type": "file_content", "content": [{"item": i} for i in ITEMS]},
    }
    body = {
        "model": "tiny-opt-xs",
        "preset": "tiny",
        "suffix": "evald",
        "config": {"sft": {"max_steps": 6, "checkpoint_interval": 2, "keep_checkpoints": 3}},
        "evals": [{"eval_id": ev.id, "every": "checkpoint", "data_source": source}],
    }
    for evals, param in (  # checked at submit, as a run of each would be
        (
            [{"eval_id": ev.id, "data_source": {**source, "input_messages": None}}],
            "evals[0].data_source.input_messages",
        ),
        ([{"eval_id": "eval-nope", "data_source": source}], "evals[0].eval_id"),
    ):
        refused = http.post("/v1/fine_tuning/jobs", json=body | {"evals": evals})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text
    created = http.post("/v1/fine_tuning/jobs", json=body).json()
    assert created["evals"] == body["evals"]
    job = _wait_job(sdk, created["id"])
    assert job.status == "succeeded", job.error
    model = str(job.fine_tuned_model)
    # checkpoints at steps 2 and 4 (the last step's weights are the final model), and the final model
    expected = {f"{model}:ckpt-step-{n}" for n in (2, 4)} | {model}
    deadline = time.monotonic() + 240
    while True:  # each checkpoint's run and the final model's, graded on the evals worker
        runs = list(sdk.evals.runs.list(ev.id, limit=100).data)
        if {r.model for r in runs} == expected and all(r.status == "completed" for r in runs):
            break
        assert time.monotonic() < deadline, [(r.model, r.status) for r in runs]
        time.sleep(1)
    assert len(runs) == 3
    rates = {r.model: r.result_counts.passed / r.result_counts.total for r in runs}
    reported = [_data(e) for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100).data]
    done = {d["model"]: d for d in reported if d.get("event_type") == "eval_completed"}
    assert set(done) == expected
    for m, d in done.items():
        assert d["pass_rates"]["pass_rate"] == pytest.approx(rates[m])
    for c in sdk.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data:
        if c.fine_tuned_model_checkpoint in expected:  # the checkpoint carries its eval's pass rates
            got = c.model_dump()["metrics"]
            assert got["eval:during:pass_rate"] == pytest.approx(rates[c.fine_tuned_model_checkpoint]), got
    # promote the best checkpoint by a criterion (ties: the later one): the job's model serves its weights
    criterion = "a sentence"

    def rate(r: Any) -> float:
        p = next(p for p in r.per_testing_criteria_results if p.testing_criteria == criterion)
        return float(p.passed / (p.passed + p.failed))

    step = {r.model: int(r.model.rsplit("-", 1)[-1]) for r in runs if r.model != model}
    best = max(step, key=lambda m: (rate(next(r for r in runs if r.model == m)), step[m]))
    promoted = http.post(
        f"/v1/fine_tuning/jobs/{job.id}/promote", json={"eval_id": ev.id, "criterion": criterion}
    )
    assert promoted.status_code == 200, promoted.text
    from service.services.checkpoints import model_folder

    with session_scope(e2e_stack.settings.db_url) as s:
        served = s.get(FineTunedModel, model).path  # type: ignore[union-attr]
        assert served == str(model_folder(s, "e2e", best, "checkpoint"))
    said = [
        sdk.chat.completions.create(
            model=m, messages=[{"role": "user", "content": ITEMS[0]["question"]}], temperature=0, max_tokens=8
        )
        .choices[0]
        .message.content
        for m in (model, best)
    ]
    assert said[0] == said[1]  # the job's model answers as the checkpoint does
    reported = [_data(e) for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert [d["checkpoint"] for d in reported if d.get("event_type") == "model_promoted"] == [best]
    bad = http.post(f"/v1/fine_tuning/jobs/{job.id}/promote", json={"eval_id": ev.id, "criterion": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "eval_id"
    http.close()


def _data(event: Any) -> dict[str, Any]:
    return dict(event.data or {})


def _wait_job(sdk: OpenAI, job_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while (job := sdk.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job.status
        time.sleep(1)
    return job
