"""Model graders judged by a model we serve, end to end: /graders/run through the official SDK asks a live
inference worker (the reply equals the model's own greedy answer, parsed by OpenAI's rules); judges that
do not exist or cannot answer a prompt are 400s naming the field; OpenAI's reinforcement workflow
with a `score_model` chat judge, a `python` grader and a cosine similarity runs through the SDK to
`succeeded` — the trainer asking the judge and the embedding model through the API's internal routes,
the judge's replies kept with the rollouts and its requests counted on the job; and `/v1/embeddings`
answers the official SDK with the served model's mean-pooled vectors."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import BadRequestError, InternalServerError, OpenAI

from service.db.models import FineTunedModel
from service.db.session import session_scope
from tests.reference import mean_pooled
from tests.service.conftest import JUDGE_QUESTION, Stack, Workers

MODEL = "tiny-opt-xs"
QUESTION = JUDGE_QUESTION  # as the reinforcement job asks it


@pytest.fixture(scope="module")
def judged(
    e2e_stack: Stack, e2e_finished: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """An inference worker on the e2e stack, an SDK client, and the finished job's model (a judge)."""
    workers = Workers(e2e_stack, tmp_path_factory.mktemp("judge-inference"))
    workers.start()
    key = e2e_stack.key("judges")
    yield {
        "key": key,
        "sdk": OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=key, timeout=120, max_retries=0),
        "http": httpx.Client(base_url=e2e_stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120),
        "tmp": tmp_path_factory.mktemp("judges"),
    }
    workers.stop()


def _reinforcement(grader: dict[str, Any], hyperparameters: dict[str, Any] | None = None) -> Any:
    """OpenAI's reinforcement `method`, as the SDK sends it."""
    return {
        "type": "reinforcement",
        "reinforcement": {"grader": grader, "hyperparameters": hyperparameters or {}},
    }


def _data(event: Any) -> dict[str, Any]:
    return dict(event.data or {})


def _greedy(path: str, content: str, tokens: int) -> str:
    """The judge model's own greedy reply, in process: what the worker must have answered."""
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams

    with ChatGenerator.load(path, score_replies=False) as engine:
        done = engine.generate(
            [{"role": "user", "content": content}], SamplingParams(max_new_tokens=tokens, temperature=0)
        )
    return done.choices[0].text


def test_graders_run_asks_a_served_judge_and_parses_its_reply(
    judged: dict[str, Any], e2e_stack: Stack
) -> None:
    sdk: OpenAI = judged["sdk"]
    item = {"question": "what is a kite"}
    sample = "A kite flies in the wind."
    grader: Any = {
        "type": "score_model",
        "name": "judge",
        "model": MODEL,
        "input": [{"role": "user", "content": QUESTION}],
        "range": [0, 10],
        "sampling_params": {"temperature": 0, "max_completions_tokens": 6, "seed": 1},
    }
    deadline = time.monotonic() + 120
    while True:  # the worker loads the model on its first request (a 503 "not ready" meanwhile)
        out = sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item=item)
        details = out.metadata.errors.api_model_grader_server_error_details or ""
        if "model_not_ready" not in details or time.monotonic() > deadline:
            break
        time.sleep(1)
    path = str(e2e_stack.settings.models_dir / MODEL)
    reply = _greedy(
        path,
        QUESTION.replace("{{sample.output_text}}", sample).replace("{{item.question}}", item["question"]),
        6,
    )
    numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)", reply)
    if numbers:  # OpenAI's rule: the reply's number, clamped to the range
        assert (
            out.reward == min(max(float(numbers[0]), 0.0), 10.0)
            and not out.metadata.errors.api_model_grader_parse_error
        )
    else:  # no number: a parse error, scored 0 — and still a 200
        assert out.reward == 0.0 and out.metadata.errors.api_model_grader_parse_error, (reply, out)
    assert not out.metadata.errors.api_model_grader_server_error, out.metadata.errors
    usage = out.api_model_grader_token_usage_per_model[MODEL]
    assert isinstance(usage, dict) and usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 10
    assert out.metadata.sampled_model_name == MODEL and out.metadata.token_usage == usage["total_tokens"]


def test_a_fine_tuned_model_judges_with_labels(
    judged: dict[str, Any], e2e_finished: dict[str, Any], e2e_stack: Stack
) -> None:
    """The e2e job's model: another tenant's here (a 400 naming the field); its owner's key runs it."""
    model = e2e_finished["job"]["fine_tuned_model"]
    labels: Any = {
        "type": "label_model",
        "name": "labels",
        "model": model,
        "input": [
            {"role": "system", "content": "Answer yes or no."},
            {"role": "user", "content": "{{sample.output_text}}"},
        ],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
        "sampling_params": {"temperature": 0, "max_completions_tokens": 4},
    }
    with pytest.raises(BadRequestError) as e:
        judged["sdk"].fine_tuning.alpha.graders.validate(grader=labels)
    assert e.value.body["param"] == "grader.model"  # type: ignore[index]
    with e2e_stack.client(e2e_stack.key("e2e")) as owner:
        out = owner.post(
            "/v1/fine_tuning/alpha/graders/run", json={"grader": labels, "model_sample": "Is a kite a toy?"}
        ).json()
    with session_scope(e2e_stack.settings.db_url) as s:
        path = s.get(FineTunedModel, model).path  # type: ignore[union-attr]
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams

    with ChatGenerator.load(path, score_replies=False) as engine:
        reply = (
            engine.generate(
                [
                    {"role": "system", "content": "Answer yes or no."},
                    {"role": "user", "content": "Is a kite a toy?"},
                ],
                SamplingParams(max_new_tokens=4, temperature=0),
            )
            .choices[0]
            .text
        )
    errors = out["metadata"]["errors"]
    assert not errors["model_grader_server_error"], errors
    said = {w for w in ("yes", "no") if re.search(rf"(?<!\w){w}(?!\w)", reply.lower())}
    if len(said) == 1:
        assert out["reward"] == (1.0 if said == {"yes"} else 0.0) and not errors["model_grader_parse_error"]
    else:
        assert out["reward"] == 0.0 and errors["model_grader_parse_error"], (reply, out)


def test_judges_that_cannot_judge_are_400s_naming_the_field(
    judged: dict[str, Any], e2e_stack: Stack, e2e_finished: dict[str, Any]
) -> None:
    sdk: OpenAI = judged["sdk"]
    # a reward model (a value head: the e2e job's step 2) in the model root, as an operator would place one
    with session_scope(e2e_stack.settings.db_url) as s:
        job_dir = Path(s.get(FineTunedModel, e2e_finished["job"]["fine_tuned_model"]).path).parents[1]  # type: ignore[union-attr]
    source = next(
        p for p in job_dir.rglob("config.json") if "ForSequenceClassification" in p.read_text()
    ).parent
    shutil.copytree(source, e2e_stack.settings.models_dir / "judge-rm", dirs_exist_ok=True)
    cases: list[tuple[dict[str, Any], str, str]] = [
        (
            {
                "type": "label_model",
                "model": "judge-rm",
                "input": [{"role": "user", "content": "x"}],
                "labels": ["a"],
                "passing_labels": ["a"],
            },
            "grader.model",
            "reward model",
        ),
        (
            {"type": "score_model", "model": "nope", "input": [{"role": "user", "content": "x"}]},
            "grader.model",
            "no base model",
        ),
        (
            {
                "type": "score_model",
                "model": MODEL,
                "input": [{"role": "user", "content": "x"}],
                "range": [2, 2],
            },
            "grader.range",
            "min < max",
        ),
        (
            {
                "type": "multi",
                "graders": {
                    "j": {
                        "type": "score_model",
                        "model": "judge-rm",
                        "input": [{"role": "user", "content": "x"}],
                    }
                },
                "calculate_output": "j",
            },
            "grader.graders.j.model",
            "drop `input`",
        ),
    ]
    for grader, param, says in cases:
        with pytest.raises(BadRequestError) as e:
            sdk.fine_tuning.alpha.graders.validate(grader={"name": "g", **grader})  # type: ignore[arg-type]
        assert e.value.body["param"] == param and says in e.value.body["message"], e.value.body  # type: ignore[index]
    # and a job naming such a judge is refused at submit, before anything runs
    rows = [
        {"messages": [{"role": "user", "content": f"Name an animal {i}."}], "answer": "dog"} for i in range(4)
    ]
    f = judged["tmp"] / "bad-judge.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    uploaded = sdk.files.create(file=f.open("rb"), purpose="fine-tune")
    with pytest.raises(BadRequestError) as e:
        sdk.fine_tuning.jobs.create(
            model=MODEL,
            training_file=uploaded.id,
            method=_reinforcement({"name": "g", **cases[1][0]}),
        )
    assert e.value.body["param"] == "method.reinforcement.grader.model"  # type: ignore[index]


def test_openais_reinforcement_workflow_with_a_chat_judge_and_a_python_grader(
    judged_job: dict[str, Any], e2e_stack: Stack
) -> None:
    """The job (tests/service/conftest.py: `judged_job`) ran through the SDK to succeeded."""
    sdk = OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=judged_job["key"], max_retries=0)
    job = sdk.fine_tuning.jobs.retrieve(judged_job["id"])
    assert job.status == "succeeded", job.error
    metrics = [
        _data(e) for e in sdk.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"
    ]
    # 8 prompts, a tenth held out to evaluate, 4 per step: one step of 4 prompts × a group of 4 answers
    assert len(metrics) == 1 and {"grader_judge", "grader_py", "grader_sim", "grader_error_rate"} <= set(
        metrics[0]
    )
    cost: Any = job.to_dict()["cost"]
    # every answer judged once (evaluation asks more): 16 requests at least, each a prompt of > 10 tokens
    assert cost["judge_requests"] >= 16 and cost["judge_tokens"] > 16 * 10, cost
    with e2e_stack.client(judged_job["key"]) as http:
        rollouts = http.get(f"/v1/fine_tuning/jobs/{job.id}/rollouts", params={"limit": 100}).json()["data"]
    assert rollouts and all(r["judges"][0]["model"] == MODEL for r in rollouts)
    # the cosine part: the server's embedding model asked through the API (a cosine, never a server error)
    assert all(
        -1 <= r["grades"]["sim"] <= 1 and "model_grader_server_error" not in r["errors"] for r in rollouts
    )
    assert len({r["grades"]["sim"] for r in rollouts}) > 1, rollouts[:2]
    replied = [r for r in rollouts if r["judges"][0]["text"] is not None]
    assert replied, rollouts[0]  # the judge answered (its text kept beside the answer it judged)
    for r in replied:
        flagged = "model_grader_parse_error" in r["errors"]
        assert flagged == (re.search(r"\d", r["judges"][0]["text"]) is None), r


def _embed_when_loaded(sdk: OpenAI, **kwargs: Any) -> Any:
    deadline = time.monotonic() + 120
    while True:  # the worker loads (or builds) the model on its first request: 503 "not ready" meanwhile
        try:
            return sdk.embeddings.create(**kwargs)
        except InternalServerError as e:  # the SDK's class for 503
            assert e.status_code == 503 and time.monotonic() < deadline, e


def test_embeddings_through_the_sdk_equal_mean_pooling_of_the_served_model(
    judged: dict[str, Any], e2e_stack: Stack
) -> None:
    sdk: OpenAI = judged["sdk"]
    texts = ["The dog is brown.", "Where does the owl live?", "A kite"]
    got = _embed_when_loaded(sdk, model=MODEL, input=texts)  # the SDK asks for base64 and decodes it
    want = mean_pooled(str(e2e_stack.settings.models_dir / MODEL), texts)
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == MODEL
    for d, w in zip(got.data, want, strict=True):
        assert d.embedding == pytest.approx(w, abs=1e-5)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(e2e_stack.settings.models_dir / MODEL))
    counts = [len(tok(t)["input_ids"]) for t in texts]
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(counts)
    floats = sdk.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(want[0], abs=1e-5)
    ids = tok(texts[0])["input_ids"]  # token ids embed as the text they spell
    assert sdk.embeddings.create(model=MODEL, input=ids).data[0].embedding == pytest.approx(want[0], abs=1e-5)
    short = sdk.embeddings.create(model=MODEL, input=texts[0], dimensions=16).data[0].embedding
    head = want[0][:16]
    norm = sum(x * x for x in head) ** 0.5
    assert short == pytest.approx([x / norm for x in head], abs=1e-5)


def test_bad_embedding_requests_are_4xx_naming_the_field(judged: dict[str, Any]) -> None:
    http: httpx.Client = judged["http"]
    _embed_when_loaded(judged["sdk"], model=MODEL, input="warm")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"model": MODEL, "input": ["fine", ""]}, 400, "input[1]"),
        ({"model": MODEL, "input": []}, 400, "input"),
        ({"model": MODEL, "input": ["fine", "dog " * 5000]}, 400, "input[1]"),
        ({"model": MODEL, "input": [1, 10**9]}, 400, "input"),
        ({"model": MODEL, "input": "x", "dimensions": 100000}, 400, "dimensions"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": MODEL, "input": ["x"] * 2049}, 400, "input"),
    ]
    for body, status, param in cases:
        r = http.post("/v1/embeddings", json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text[:500])
        assert "Traceback" not in r.text


def test_a_cosine_grader_compares_the_server_embedding_models_vectors(
    judged: dict[str, Any], e2e_stack: Stack
) -> None:
    """/graders/run with OpenAI's cosine metric: the cosine of the two texts' /v1/embeddings vectors by the
    server's embedding model (RLHF_EMBEDDING_MODEL; the tests' stacks name tiny-opt-xs)."""
    sdk: OpenAI = judged["sdk"]
    model = e2e_stack.settings.embedding_model
    grader: Any = {
        "type": "text_similarity",
        "name": "sim",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "evaluation_metric": "cosine",
        "pass_threshold": 0.5,
    }
    sample, answer = "The owl lives in the forest.", "An owl is found in the forest."
    a, b = _embed_when_loaded(sdk, model=model, input=[sample, answer], encoding_format="float").data
    out = sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item={"answer": answer})
    assert not out.metadata.errors.api_model_grader_server_error, out.metadata.errors
    cos = sum(x * y for x, y in zip(a.embedding, b.embedding, strict=True))
    assert out.reward == pytest.approx(cos, abs=1e-5) and -1 <= out.reward <= 1
    usage = out.api_model_grader_token_usage_per_model[model]
    assert isinstance(usage, dict) and usage["prompt_tokens"] > 0
    same = sdk.fine_tuning.alpha.graders.run(grader=grader, model_sample=answer, item={"answer": answer})
    assert same.reward == pytest.approx(1.0, abs=1e-5)  # a text is its own nearest


NAMES_SUBJECT = (
    "The answer: {{sample.output_text}}\nDoes the answer name the {{item.subject}}? Reply yes or no."
)


def _train_judge(sft: Path, base_model: Path, out: Path) -> Path:
    """A judge as a user would make one: the SFT model's answers to 1,600 training questions, labelled by
    whether they name the subject, and a tiny model fine-tuned on them (≈ 40 s; 94% right on held-out
    answers when measured)."""
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams
    from rlhf_engine.data.bundled import bundled_path
    from tests.runs import rlhf_ok

    rows = [json.loads(line) for line in bundled_path("bundled:questions").read_text().splitlines()][:1600]
    with ChatGenerator.load(str(sft), max_queue=len(rows), score_replies=False) as engine:
        handles = [
            engine.submit(r["messages"], SamplingParams(max_new_tokens=32, temperature=1.0, seed=i))
            for i, r in enumerate(rows)
        ]
        answers = [h.result().choices[0].text.strip() for h in handles]
    out.mkdir(parents=True, exist_ok=True)
    data = out / "judge.jsonl"
    prompt = NAMES_SUBJECT.replace("{{item.subject}}", "{s}").replace("{{sample.output_text}}", "{a}")
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": prompt.format(s=r["subject"], a=a)},
                        {"role": "assistant", "content": "yes" if r["subject"] in a.lower() else "no"},
                    ]
                }
            )
            + "\n"
            for r, a in zip(rows, answers, strict=True)
        )
    )
    rlhf_ok(
        "sft",
        "--model",
        base_model,
        "--data",
        data,
        "--output-dir",
        out,
        "--num-train-epochs",
        4,
        "--per-device-train-batch-size",
        16,
        "--gradient-accumulation-steps",
        1,
        "--learning-rate",
        2e-3,
        "--max-seq-len",
        96,
        "--eval-fraction",
        0.05,
    )
    return out / "step1_sft"


def test_grpo_with_a_served_label_model_judge_raises_the_held_out_pass_rate(
    judged: dict[str, Any], e2e_stack: Stack, pipeline_run: Path, base_model: Path
) -> None:
    """OpenAI's reinforcement workflow with a `label_model` judge — a model we serve, asked through the
    inference workers by the trainer — teaches the bundled task as the string_check does
    (tests/rlhf_engine/stages/test_graded_rl.py): the held-out pass rate, checked by the rule itself on
    200 questions no file holds, rises by ≥ 15 points."""
    from rlhf_engine.data.bundled import bundled_path
    from rlhf_engine.data.bundled.world import SUBJECTS
    from rlhf_engine.stages.heldout import heldout_report

    sdk: OpenAI = judged["sdk"]
    models = e2e_stack.settings.models_dir
    sft = pipeline_run / "step1_sft"
    judge = _train_judge(sft, base_model, judged["tmp"] / "names-judge")
    shutil.copytree(judge, models / "names-judge", dirs_exist_ok=True)  # placed as an operator would
    shutil.copytree(sft, models / "names-sft", dirs_exist_ok=True)
    uploaded = sdk.files.create(file=bundled_path("bundled:questions").open("rb"), purpose="fine-tune")
    grader: Any = {
        "type": "label_model",
        "name": "names_subject",
        "model": "names-judge",
        "input": [{"role": "user", "content": NAMES_SUBJECT}],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
        "sampling_params": {"temperature": 0, "max_completions_tokens": 4},
    }
    grpo = {  # as test_graded_rl's run
        "algorithm": "grpo",
        "samples_per_prompt": 4,
        "per_device_generation_batch_size": 4,
        "per_device_training_batch_size": 16,
        "max_answer_len": 32,
        "actor_learning_rate": 3e-4,
        "num_warmup_steps": 0,
        "max_seq_len": 128,
        "max_prompt_len": 64,
        "max_steps": 30,
        "checkpoint_interval": 10,
        "eval_max_rows": 100,
    }
    job = sdk.fine_tuning.jobs.create(
        model="names-sft",
        training_file=uploaded.id,
        method=_reinforcement(grader),
        extra_body={"config": {"ppo": grpo}},
    )
    deadline = time.monotonic() + 400
    while (job := sdk.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job.status
        time.sleep(1)
    assert job.status == "succeeded", job.error
    with session_scope(e2e_stack.settings.db_url) as s:
        actor = Path(s.get(FineTunedModel, job.fine_tuned_model).path)  # type: ignore[union-attr]
    summary = json.loads(next(actor.parent.rglob("summary.json")).read_text())
    # the judge's own view of the held-out prompts of the file, before and after
    assert summary["eval_reward_after"] >= summary["eval_reward_before"] + 0.15, summary
    rm = str(pipeline_run / "step2_reward")
    before = heldout_report(str(sft), reference=str(sft), reward_model=rm, n=200)
    after = heldout_report(str(actor), reference=str(sft), reward_model=rm, n=200)
    assert after["subject_rate"] >= before["subject_rate"] + 0.15, (before, after)
    cost: Any = job.to_dict()["cost"]
    assert cost["judge_requests"] >= 30 * 16, cost  # every answer judged once (evaluation asks more)
    with e2e_stack.client(judged["key"]) as http:
        rollouts = http.get(f"/v1/fine_tuning/jobs/{job.id}/rollouts", params={"limit": 100}).json()["data"]
    agree = 0
    for r in rollouts:  # the served judge mostly judged as the rule does (measured: 86 of the last 100)
        subject = next(s for s in SUBJECTS if re.search(rf"\b{s}\b", r["prompt"]))
        agree += r["reward"] == float(subject in r["answer"].lower())
    assert rollouts and agree >= 0.75 * len(rollouts), (agree, len(rollouts))
