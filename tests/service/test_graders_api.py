"""OpenAI's grader endpoints on a real server: /validate checks a grader, /run scores one sample with
its training row — python in the sandbox, a judge's failure as an error flag with 200; bad graders are
400s naming the field, over HTTP and through the openai SDK. (Judges answering through live inference
workers: tests/service/test_judges.py.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.service.conftest import Stack

OUT = "{{sample.output_text}}"
CHECK = {
    "type": "string_check",
    "name": "city",
    "input": OUT,
    "reference": "{{item.answer}}",
    "operation": "ilike",
}
MULTI = {
    "type": "multi",
    "name": "blend",
    "graders": {
        "city": CHECK,
        "close": {
            "type": "text_similarity",
            "input": OUT,
            "reference": "{{item.answer}}",
            "evaluation_metric": "fuzzy_match",
        },
    },
    "calculate_output": "0.75 * city + 0.25 * close",
}
URL = "/v1/fine_tuning/alpha/graders"
JUDGE = [{"role": "user", "content": "Is '{{sample.output_text}}' right? Answer a number."}]
PYTHON = {
    "type": "python",
    "name": "py",
    "source": "def grade(sample, item):\n"
    "    return float(item['answer'].lower() in sample['output_text'].lower())",
}


@pytest.fixture(scope="module")
def stack(make_stack: Callable[..., Stack]) -> Stack:
    # an operator's typo in RLHF_EMBEDDING_MODEL: cosine graders are refused, naming the setting
    return make_stack(embedding_model="smollm2-135m-instruc")


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client(stack.key("grader-user")) as c:
        yield c


def _error(resp: httpx.Response, param: str) -> str:
    assert resp.status_code == 400, resp.text
    body = resp.json()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error", body
    return str(body["message"])


def test_validate_returns_a_grader_that_can_work(client: httpx.Client, stack: Stack) -> None:
    assert client.post(f"{URL}/validate", json={"grader": MULTI}).json() == {"grader": MULTI}
    with stack.client() as anonymous:
        assert anonymous.post(f"{URL}/validate", json={"grader": MULTI}).status_code == 401


def test_run_scores_a_sample_with_its_row(client: httpx.Client) -> None:
    out = client.post(
        f"{URL}/run", json={"grader": CHECK, "model_sample": "It is PARIS.", "item": {"answer": "Paris"}}
    ).json()
    assert out["reward"] == 1.0 and out["sub_rewards"] == {"city": 1.0}
    assert out["metadata"]["name"] == "city" and out["metadata"]["type"] == "string_check"
    assert not any(out["metadata"]["errors"].values())
    # "Pari" vs "Paris": not contained (0), fuzzy ratio 8/9 → 0.25 · 8/9
    blend = client.post(
        f"{URL}/run", json={"grader": MULTI, "model_sample": "Pari", "item": {"answer": "Paris"}}
    ).json()
    assert blend["sub_rewards"] == pytest.approx({"city": 0.0, "close": 8 / 9})
    assert blend["reward"] == pytest.approx(0.25 * 8 / 9)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"grader": {"type": "python", "source": "def grade(s, i) return 1"}}, "grader.source", "not valid"),
        ({"grader": {"type": "python", "source": "x = 1"}}, "grader.source", "grade(sample, item)"),
        (
            {
                "grader": {
                    "type": "label_model",
                    "model": "no-such-model",
                    "input": JUDGE,
                    "labels": ["a"],
                    "passing_labels": ["a"],
                }
            },
            "grader.model",
            "no base model",
        ),
        ({"grader": {**MULTI, "calculate_output": "city + nope"}}, "grader.calculate_output", "'nope'"),
        (
            {"grader": {**MULTI, "calculate_output": "__import__('os')"}},
            "grader.calculate_output",
            "not allowed",
        ),
        ({"grader": {**CHECK, "operation": "regex"}}, "grader.operation", "eq, ne, like, ilike"),
        (
            {
                "grader": {
                    "type": "text_similarity",
                    "input": OUT,
                    "reference": "x",
                    "evaluation_metric": "cosine",
                }
            },
            "grader.evaluation_metric",
            "embedding model 'smollm2-135m-instruc' (RLHF_EMBEDDING_MODEL)",
        ),
        ({"grader": [1, 2]}, "grader", ""),
    ],
)
def test_graders_that_cannot_work_are_400_naming_the_field(
    client: httpx.Client, body: dict[str, Any], param: str, says: str
) -> None:
    for route in ("validate", "run"):
        sent = body | ({"model_sample": "x"} if route == "run" else {})
        assert says in _error(client.post(f"{URL}/{route}", json=sent), param)


def test_run_refuses_a_row_without_the_fields_and_score_model_graders(client: httpx.Client) -> None:
    message = _error(
        client.post(f"{URL}/run", json={"grader": CHECK, "model_sample": "Paris", "item": {"question": "?"}}),
        "item",
    )
    assert "answer" in message and "question" in message
    score_model = {"type": "score_model", "name": "rm", "model": "tiny-opt-xs"}
    assert client.post(f"{URL}/validate", json={"grader": score_model}).status_code == 200
    assert "inside jobs" in _error(
        client.post(f"{URL}/run", json={"grader": score_model, "model_sample": "x"}), "grader"
    )


def test_python_graders_run_in_the_sandbox_and_their_errors_are_flags(client: httpx.Client) -> None:
    out = client.post(
        f"{URL}/run", json={"grader": PYTHON, "model_sample": "It is PARIS.", "item": {"answer": "Paris"}}
    ).json()
    assert out["reward"] == 1.0 and not any(v for k, v in out["metadata"]["errors"].items())
    broken = {**PYTHON, "source": "def grade(sample, item):\n    return item['missing']"}
    out = client.post(f"{URL}/run", json={"grader": broken, "model_sample": "x", "item": {}}).json()
    errors = out["metadata"]["errors"]
    assert out["reward"] == 0.0 and errors["python_grader_runtime_error"] is True
    assert "KeyError: 'missing'" in errors["python_grader_runtime_error_details"]
    assert errors["python_grader_server_error"] is False and out["metadata"]["type"] == "python"


def test_a_judge_without_a_worker_is_a_server_error_flag_not_a_failure(client: httpx.Client) -> None:
    """This stack runs no inference worker: the judge cannot be asked, and /run still answers 200."""
    judge = {"type": "score_model", "name": "j", "model": "tiny-opt-xs", "input": JUDGE}
    out = client.post(f"{URL}/run", json={"grader": judge, "model_sample": "x"}).json()
    errors = out["metadata"]["errors"]
    assert out["reward"] == 0.0 and errors["model_grader_server_error"] is True
    assert "no inference worker" in errors["model_grader_server_error_details"]
    assert out["metadata"]["sampled_model_name"] == "tiny-opt-xs"


def test_many_judged_runs_at_once_all_answer(stack: Stack) -> None:
    """More concurrent /run requests with a judge than the API has default threads: each grader waits on
    its judge, which routes through the same loop — none may starve the others (it deadlocked once)."""
    import concurrent.futures

    judge = {"type": "score_model", "name": "j", "model": "tiny-opt-xs", "input": JUDGE}
    key = stack.key("grader-many")

    def one(i: int) -> int:
        with stack.client(key) as c:
            r = c.post(f"{URL}/run", json={"grader": judge, "model_sample": f"x{i}"}, timeout=60)
            assert r.json()["metadata"]["errors"]["model_grader_server_error"] is True, r.text
            return r.status_code

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        assert list(pool.map(one, range(24))) == [200] * 24


def test_the_openai_sdk_runs_and_validates_graders(stack: Stack) -> None:
    from openai import BadRequestError, OpenAI

    sdk = OpenAI(api_key=stack.key("grader-sdk"), base_url=f"{stack.url}/v1", max_retries=0)
    out = sdk.fine_tuning.alpha.graders.run(grader=MULTI, model_sample="paris", item={"answer": "Paris"})  # type: ignore[arg-type]
    assert out.reward == pytest.approx(0.75 + 0.25 * 0.8) and out.metadata.name == "blend"
    assert sdk.fine_tuning.alpha.graders.validate(grader=CHECK).grader is not None  # type: ignore[arg-type]
    with pytest.raises(BadRequestError) as e:
        sdk.fine_tuning.alpha.graders.validate(grader={"type": "python", "source": "x", "name": "p"})
    assert e.value.body["param"] == "grader.source"  # type: ignore[index]
    ran = sdk.fine_tuning.alpha.graders.run(grader=PYTHON, model_sample="paris", item={"answer": "Paris"})  # type: ignore[arg-type]
    assert ran.reward == 1.0 and ran.metadata.errors.python_grader_runtime_error is False
