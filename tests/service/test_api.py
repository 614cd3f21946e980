"""The REST contract on SQLite and on PostgreSQL, without workers (jobs stay queued).

Auth on every route, tenant isolation, the error envelope with the field at fault, nothing stored on
a refused request, files validated on upload, idempotency, state transitions, estimates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from service.db.models import File, Job, JobEvent
from service.db.session import session_scope
from service.services import files as files_svc
from tests.service.conftest import SMALL_SFT, Stack

SUBJECT = {
    "type": "string_check",
    "name": "names_subject",
    "operation": "ilike",
    "input": "{{sample.output_text}}",
    "reference": "{{item.subject}}",
}
PREF = (
    "\n".join(
        json.dumps(
            {
                "prompt": f"Human: What is a dog {i}? Assistant:",
                "chosen": " A dog is an animal.",
                "rejected": " Blue.",
            }
        )
        for i in range(40)
    )
    + "\n"
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, make_stack: Callable[..., Stack]) -> Stack:
    if request.param == "postgresql":
        return make_stack(database_url=request.getfixturevalue("new_pg")())
    return make_stack()


@pytest.fixture(scope="module")
def alice(stack: Stack) -> Iterator[Any]:
    with stack.client(stack.key("alice")) as c:
        yield c


@pytest.fixture(scope="module")
def bob(stack: Stack) -> Iterator[Any]:
    with stack.client(stack.key("bob")) as c:
        yield c


def counts(stack: Stack) -> tuple[int, int, int]:
    with session_scope(stack.settings.db_url) as s:
        return (
            s.scalar(select(func.count()).select_from(Job)) or 0,
            s.scalar(select(func.count()).select_from(File)) or 0,
            s.scalar(select(func.count()).select_from(JobEvent)) or 0,
        )


def upload(client: Any, text: str, name: str = "pref.jsonl") -> Any:
    return client.post("/v1/files", files={"file": (name, text.encode())}, data={"purpose": "fine-tune"})


def error(resp: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["param"] == param, body
    return dict(body)


def test_health_needs_no_key(stack: Stack) -> None:
    with stack.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"status": "ready"}


ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/file-x"),
    ("DELETE", "/v1/files/file-x"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs/estimate"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-x/pause"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-x/resume"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/events"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/checkpoints"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/metrics"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/rollouts"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_a_valid_key(stack: Stack, method: str, path: str) -> None:
    with stack.client() as c:
        assert error(c.request(method, path), 401)["code"] == "missing_api_key"
    with stack.client("sk-rlhf-not-a-key") as c:
        assert error(c.request(method, path), 401)["code"] == "invalid_api_key"


def test_revoked_keys_stop_working_and_metrics_need_an_operator(stack: Stack) -> None:
    from service.services.keys import list_keys, revoke_key

    key = stack.key("carol")
    with stack.client(key) as c:
        assert c.get("/v1/models").status_code == 200
        error(c.get("/metrics"), 403)
        with session_scope(stack.settings.db_url) as s:
            revoke_key(session=s, key_id=list_keys(session=s, tenant="carol")[0].id)
        revoked = time.monotonic()
        while (r := c.get("/v1/models")).status_code == 200 and time.monotonic() - revoked < 10:
            time.sleep(0.05)  # a verified key is trusted for auth_cache_s (1 s here; 5 s by default)
        error(r, 401)
        assert time.monotonic() - revoked <= stack.settings.auth_cache_s + 0.5
    with stack.client(stack.key("ops", operator=True)) as c:
        body = c.get("/metrics").text
        assert 'rlhf_jobs{status="queued"}' in body and "rlhf_queue_depth" in body


def test_files_are_validated_on_upload_and_scoped_to_the_tenant(stack: Stack, alice: Any, bob: Any) -> None:
    f = upload(alice, PREF).json()
    assert (f["object"], f["kind"], f["rows"], f["purpose"]) == ("file", "preference", 40, "fine-tune")
    assert alice.get(f"/v1/files/{f['id']}").json()["id"] == f["id"]
    assert f["id"] in [x["id"] for x in alice.get("/v1/files").json()["data"]]
    error(bob.get(f"/v1/files/{f['id']}"), 404, "file_id")
    assert f["id"] not in [x["id"] for x in bob.get("/v1/files").json()["data"]]
    before = counts(stack)
    bad = error(
        upload(alice, '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": 3}\n'), 400, "file"
    )
    assert "line 2" in bad["message"]
    error(upload(alice, "x", name="data.csv"), 400, "file")
    error(
        alice.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "assistants"}),
        400,
        "purpose",
    )
    error(upload(alice, "", name="empty.jsonl"), 400, "file")
    assert counts(stack) == before
    assert alice.delete(f"/v1/files/{f['id']}").json() == {"id": f["id"], "object": "file", "deleted": True}
    error(alice.get(f"/v1/files/{f['id']}"), 404)


def test_real_hh_data_with_a_few_odd_rows_is_taken_and_the_rows_left_out_are_shown(alice: Any) -> None:
    """Anthropic's HH-RLHF as it is: answers containing "Human:", a few transcripts without an answer."""

    def hh(q: str, a: str) -> str:
        return f"\n\nHuman: {q}\n\nAssistant: {a}"

    good = [
        {"chosen": hh(f"Question {i}?", "Human: No, you are."), "rejected": hh(f"Question {i}?", "Sure.")}
        for i in range(99)
    ]
    odd = {"chosen": "\n\nHuman: Hi?", "rejected": "\n\nHuman: Hi?"}
    f = upload(alice, "\n".join(json.dumps(r) for r in [*good, odd]) + "\n").json()
    assert (f["kind"], f["rows"]) == ("preference", 99)
    assert f["skipped"] == {"unusable: chosen: an HH transcript must end with an 'Assistant:' turn": 1}
    assert alice.get(f"/v1/files/{f['id']}").json()["skipped"] == f["skipped"]
    bad = error(upload(alice, "\n".join(json.dumps(r) for r in [*good[:10], odd, odd]) + "\n"), 400, "file")
    assert "2 of 12 rows cannot be used" in bad["message"] and "first at lines 11, 12" in bad["message"]


def test_job_create_get_list_and_isolation(stack: Stack, alice: Any, bob: Any) -> None:
    job = alice.post(
        "/v1/fine_tuning/jobs", json=SMALL_SFT | {"suffix": "demo", "metadata": {"team": "a"}}
    ).json()
    assert job["object"] == "fine_tuning.job" and job["status"] == "queued"
    assert job["method"]["type"] == "supervised" and job["steps"] == [1]
    assert job["estimated_finish"] is not None and job["cost"]["estimated_usd"] > 0
    assert alice.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["id"] == job["id"]
    error(bob.get(f"/v1/fine_tuning/jobs/{job['id']}"), 404)
    error(bob.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel"), 404)
    error(bob.get(f"/v1/fine_tuning/jobs/{job['id']}/events"), 404)
    assert job["id"] not in [j["id"] for j in bob.get("/v1/fine_tuning/jobs").json()["data"]]
    events = alice.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()
    assert events["data"][0]["object"] == "fine_tuning.job.event"


def test_every_list_pages_one_way(alice: Any, walk: Any) -> None:
    """Jobs, events, files and models: `after` = the last id of the previous page, `limit`, and
    `has_more`/`first_id`/`last_id` in the answer; page by page gives the whole list, in order."""
    ids = [alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()["id"] for _ in range(3)]
    page1 = alice.get("/v1/fine_tuning/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page1["data"]] == ids[::-1][:2] and page1["has_more"]
    page2 = alice.get("/v1/fine_tuning/jobs", params={"limit": 2, "after": page1["last_id"]}).json()
    assert page2["data"][0]["id"] == ids[0]
    alice.post(f"/v1/fine_tuning/jobs/{ids[0]}/pause")
    alice.post(f"/v1/fine_tuning/jobs/{ids[0]}/resume")
    for _ in range(3):
        upload(alice, PREF)
    for url, newest_first in (
        ("/v1/fine_tuning/jobs", True),
        (f"/v1/fine_tuning/jobs/{ids[0]}/events", True),
        ("/v1/files", True),
        ("/v1/models", False),
    ):
        whole = alice.get(url, params={"limit": 100}).json()
        assert not whole["has_more"] and len(whole["data"]) >= 3, url
        for limit in (1, 2):
            assert walk(alice, url, limit) == whole["data"], (url, limit)
        if newest_first:
            created = [d["created_at"] for d in whole["data"]]
            assert created == sorted(created, reverse=True), url
        error(alice.get(url, params={"after": "no-such-id"}), 404, "after")


def test_a_wandb_integration_reaches_every_step_and_a_key_never_enters(
    alice: Any, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    wandb = {"type": "wandb", "wandb": {"project": "rlhf", "name": "demo", "entity": "team", "tags": ["a"]}}
    job = alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"integrations": [wandb]}).json()
    assert job["integrations"] == [wandb]
    from service.db.models import Job
    from service.db.session import session_scope

    with session_scope(stack.settings.db_url) as s:
        plan = s.get(Job, job["id"]).plan  # type: ignore[union-attr]
    assert (
        plan["1"]["wandb_project"] == "rlhf"
        and plan["1"]["wandb_tags"] == ["a"]
        and plan["1"]["enable_tensorboard"]
    )
    keyed = {"type": "wandb", "wandb": {"project": "rlhf", "api_key": "x" * 40}}
    error(
        alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"integrations": [keyed]}),
        400,
        "integrations[0].wandb.api_key",
    )
    other = {"type": "slack", "wandb": {"project": "p"}}
    error(
        alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"integrations": [other]}),
        400,
        "integrations[0].type",
    )
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # a server without the wandb extra
    missing = error(
        alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"integrations": [wandb]}), 400, "integrations"
    )
    assert "rlhf-service[wandb]" in missing["message"]


def test_reinforcement_job_from_one_preference_file(alice: Any) -> None:
    f = upload(
        alice, PREF * 20
    ).json()  # 800 rows: a default global batch for every step (step 1: 144 ≥ 16 × 8)
    job = alice.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-opt-xs", "reward_model": "tiny-opt-xs", "training_file": f["id"], "seed": 7},
    ).json()
    assert job["method"]["type"] == "reinforcement" and job["steps"] == [1, 2, 3] and job["seed"] == 7
    error(alice.delete(f"/v1/files/{f['id']}"), 400, "file_id")  # a live job uses it
    alice.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert alice.delete(f"/v1/files/{f['id']}").json()["deleted"]


BAD_JOBS = [
    ({}, "model"),
    ({"model": "tiny-opt-xs", "method": {"type": "dpo"}, "reward_model": "tiny-opt-xs"}, "reward_model"),
    ({"model": "tiny-opt-xs", "method": {"type": "dpo"}, "steps": [1, 2, 3]}, "steps"),
    (
        {"model": "tiny-opt-xs", "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
        "method.dpo.hyperparameters.beta",
    ),
    (
        {
            "model": "tiny-opt-xs",
            "method": {"type": "dpo"},
            "config": {"dpo": {"loss": "simpo", "offload_reference_model": True}},
        },
        "loss",
    ),
    (
        {
            "model": "tiny-opt-xs",
            "method": {"type": "dpo"},
            "config": {"dpo": {"reference_model_name_or_path": "/x"}},
        },
        "config.dpo.reference_model_name_or_path",
    ),
    ({"model": "tiny-opt-xs", "method": {"type": "reinforcement"}}, "reward_model"),
    (
        {
            "model": "tiny-opt-xs",
            "method": {
                "type": "reinforcement",
                "reinforcement": {
                    "grader": {"type": "python", "source": "def score(sample, item): return 1.0"}
                },
            },
        },
        "method.reinforcement.grader.source",
    ),
    (
        {
            "model": "tiny-opt-xs",
            "method": {
                "type": "reinforcement",
                "reinforcement": {"grader": SUBJECT | {"reference": "{{item.answer}}"}},
            },
        },
        "method.reinforcement.grader",
    ),  # bundled:questions rows have no answer
    (
        {
            "model": "tiny-opt-xs",
            "method": {
                "type": "reinforcement",
                "reinforcement": {
                    "grader": {"type": "multi", "graders": {"a": SUBJECT}, "calculate_output": "a + b"}
                },
            },
        },
        "method.reinforcement.grader.calculate_output",
    ),
    (
        {
            "model": "tiny-opt-xs",
            "reward_model": "tiny-opt-xs",
            "method": {"type": "reinforcement", "reinforcement": {"grader": SUBJECT}},
        },
        "reward_model",
    ),
    (
        {
            "model": "tiny-opt-xs",
            "method": {"type": "reinforcement", "reinforcement": {"grader": SUBJECT}},
            "config": {"ppo": {"algorithm": "ppo"}},
        },
        "config.ppo.algorithm",
    ),
    (
        {
            "model": "tiny-opt-xs",
            "method": {"type": "reinforcement", "reinforcement": {"grader": SUBJECT}},
            "config": {"ppo": {"samples_per_prompt": 1}},
        },
        "samples_per_prompt",
    ),
    (
        {
            "model": "tiny-opt-xs",
            "method": {"type": "reinforcement", "reinforcement": {"grader": SUBJECT}},
            "steps": [1, 2, 3],
        },
        "steps",
    ),
    ({"model": "no-such-model"}, "model"),
    ({"model": "../etc"}, "model"),
    ({"model": "tiny-opt-xs", "training_file": "file-nope"}, "training_file"),
    ({"model": "tiny-opt-xs", "hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    (
        {
            "model": "tiny-opt-xs",
            "hyperparameters": {"n_epochs": 2},
            "config": {"sft": {"num_train_epochs": 3}},
        },
        "hyperparameters.n_epochs",
    ),
    ({"model": "tiny-opt-xs", "config": {"sft": {"learning_rate": 5}}}, "learning_rate"),
    ({"model": "tiny-opt-xs", "config": {"sft": {"no_such_option": 1}}}, None),
    ({"model": "tiny-opt-xs", "config": {"sft": {"output_dir": "/etc"}}}, "config.sft.output_dir"),
    ({"model": "tiny-opt-xs", "config": {"sft": {"tensorboard_path": "/etc/tb"}}}, "tensorboard_path"),
    ({"model": "tiny-opt-xs", "num_gpus": 9}, "num_gpus"),
    ({"model": "tiny-opt-xs", "gpu_type": "TPU"}, "gpu_type"),
    ({"model": "tiny-opt-xs", "config": {"sft": {"max_seq_len": 100000}}}, "config.sft.max_seq_len"),
    ({"model": "tiny-opt-xs", "data_split": "1,2"}, "data_split"),
    ({"model": "tiny-opt-xs", "suffix": "bad suffix!"}, "suffix"),
    ({"model": "tiny-opt-xs", "validation_file": "file-x"}, "validation_file"),
    ({"model": "tiny-opt-xs", "unknown_field": 1}, "unknown_field"),
    ({"model": "tiny-opt-xs", "max_cost_usd": -1}, "max_cost_usd"),
]


def test_a_job_whose_data_cannot_fill_one_batch_is_refused_at_submit(stack: Stack, alice: Any) -> None:
    """40 rows, 10% held out for eval, split 2,4,4: steps 1, 2 and 3 get 7, 15 and 14 rows; a global batch
    of 16 × 8 set for step 1 cannot be filled, nor a batch_size above the rows."""
    f = upload(alice, PREF).json()
    before = counts(stack)
    body: dict[str, Any] = {"model": "tiny-opt-xs", "reward_model": "tiny-opt-xs", "training_file": f["id"]}
    too_big = body | {"hyperparameters": {"batch_size": 8}}
    err = error(alice.post("/v1/fine_tuning/jobs", json=too_big), 400, "hyperparameters.batch_size")
    assert "more than the 7 training rows step 1 gets" in err["message"], err
    body["config"] = {"sft": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 8}}
    err = error(alice.post("/v1/fine_tuning/jobs", json=body), 400, "config.sft")
    assert "step 1 gets at most 7 training rows" in err["message"], err
    assert "per_device_train_batch_size × gradient_accumulation_steps × processes = 128" in err["message"], (
        err
    )
    # smaller batches fit step 1; then step 2 (15 rows; 4 × 4 = 16) is the one refused
    body["config"] = {
        "sft": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1},
        "reward": {"per_device_train_batch_size": 4},
    }
    err = error(alice.post("/v1/fine_tuning/jobs", json=body), 400, "config.reward")
    assert "step 2 gets at most 15 training rows" in err["message"], err
    assert counts(stack) == before
    body["config"] |= {
        "reward": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2},
        "ppo": {"per_device_generation_batch_size": 8, "per_device_training_batch_size": 8},
    }
    job = alice.post("/v1/fine_tuning/jobs", json=body).json()
    assert job["status"] == "queued", job
    alice.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")


@pytest.mark.parametrize(("body", "param"), BAD_JOBS)
def test_bad_job_requests_are_400_naming_the_field_and_store_nothing(
    stack: Stack, alice: Any, body: dict[str, Any], param: str | None
) -> None:
    before = counts(stack)
    err = error(alice.post("/v1/fine_tuning/jobs", json=body), 400, param)
    assert err["message"]
    assert counts(stack) == before


def test_malformed_and_oversized_bodies(stack: Stack, alice: Any) -> None:
    before = counts(stack)
    error(
        alice.post(
            "/v1/fine_tuning/jobs", content=b"{not json", headers={"Content-Type": "application/json"}
        ),
        400,
    )
    error(alice.post("/v1/fine_tuning/jobs", json=["a list"]), 400)
    big = {"model": "tiny-opt-xs", "metadata": {"k": "x" * (2 * stack.settings.max_body_bytes)}}
    error(alice.post("/v1/fine_tuning/jobs", json=big), 413)
    error(alice.get("/v1/fine_tuning/jobs", params={"limit": 0}), 400, "limit")
    error(alice.get("/v1/nothing-here"), 404)
    assert counts(stack) == before


def test_idempotency_key(stack: Stack, alice: Any) -> None:
    h = {"Idempotency-Key": "abc-123"}
    first = alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT, headers=h).json()
    again = alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT, headers=h).json()
    assert first["id"] == again["id"]
    before = counts(stack)
    error(alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"seed": 5}, headers=h), 409, "Idempotency-Key")
    assert counts(stack) == before


def test_state_transitions(alice: Any) -> None:
    job = alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    error(alice.post(f"{url}/resume"), 400)  # queued, not paused
    assert alice.post(f"{url}/pause").json()["status"] == "paused"
    error(alice.post(f"{url}/pause"), 400)
    assert alice.post(f"{url}/resume").json()["status"] == "queued"
    assert alice.post(f"{url}/cancel").json()["status"] == "cancelled"
    for action in ("cancel", "pause", "resume"):
        assert "cancelled" in error(alice.post(f"{url}/{action}"), 400)["message"]


def test_estimate_matches_deepspeed_chat_table_1(alice: Any) -> None:
    """OPT-13B + OPT-350M on 8×A100-80G, 135M tokens: ≈9 h and ≈$290; OPT-30B: ≈18 h, ≈$600 (±30%)."""
    common = {
        "reward_model": "tiny-opt-xs",
        "steps": [1, 2, 3],
        "num_gpus": 8,
        "gpu_type": "A100-80G",
        "tokens": {"1": 0, "2": 0, "3": 135_000_000},
        "reward_model_parameters": 350_000_000,
    }
    for params, hours, usd in ((13e9, 9, 290), (30e9, 18, 600)):
        est = alice.post(
            "/v1/fine_tuning/jobs/estimate",
            json=common | {"model": "tiny-opt-xs", "model_parameters": int(params)},
        ).json()
        step3 = next(s for s in est["steps"] if s["step"] == 3)
        assert step3["seconds"] / 3600 == pytest.approx(hours, rel=0.3)
        assert step3["usd"] == pytest.approx(usd, rel=0.3)
    small = alice.post("/v1/fine_tuning/jobs/estimate", json=SMALL_SFT).json()
    assert small["gpu_type"] == "cpu" and 0 < small["seconds"] < 600 and small["usd"] > 0
    # GRPO samples 4 answers to each of the same prompts: step 3 generates and trains on 4 times the tokens
    rl = {"model": "tiny-opt-xs", "reward_model": "tiny-opt-xs", "preset": "tiny"}
    ppo = alice.post("/v1/fine_tuning/jobs/estimate", json=rl).json()["steps"][2]
    grpo = alice.post(
        "/v1/fine_tuning/jobs/estimate",
        json=rl | {"config": {"ppo": {"algorithm": "grpo", "samples_per_prompt": 4}}},
    ).json()["steps"][2]
    assert grpo["tokens"] == pytest.approx(4 * ppo["tokens"], rel=0.01)


def test_the_estimate_plans_each_steps_memory_and_refuses_what_cannot_fit(alice: Any, stack: Stack) -> None:
    """The memory planner at submit: each step's plan on the requested GPUs; a step that does not fit as
    configured takes the planner's fastest configuration that does (memory: auto), keeping what the
    request set; memory: fixed, or nothing that fits, is a 400 that names what would fit."""
    gib = 2**30
    tiny = alice.post(
        "/v1/fine_tuning/jobs/estimate",
        json={
            "model": "tiny-opt-xs",
            "reward_model": "tiny-opt-xs",
            "preset": "tiny",
            "gpu_type": "A100-80G",
        },
    ).json()
    assert [m["step"] for m in tiny["memory"]] == [1, 2, 3]
    for m in tiny["memory"]:
        assert (
            m["fits"] and not m["changed"] and m["configuration"] == "ZeRO-0" and m["gpu_bytes"] == 80 * gib
        )
        assert (
            m["headroom_bytes"] == m["gpu_bytes"] - m["per_gpu_bytes"] and m["per_gpu_bytes"] > gib
        )  # (+1 GiB CUDA)
    on_cpu = alice.post("/v1/fine_tuning/jobs/estimate", json=SMALL_SFT).json()["memory"][0]
    assert on_cpu["fits"] is None and on_cpu["gpu_bytes"] is None and on_cpu["per_gpu_bytes"] > 0
    big = {
        "model": "tiny-opt-xs",
        "reward_model": "tiny-opt-xs",
        "steps": [1, 2, 3],
        "model_parameters": 13_000_000_000,
        "reward_model_parameters": 350_000_000,
        "tokens": {"1": 0, "2": 0, "3": 135_000_000},
        "gpu_type": "A100-40G",
    }
    planned = alice.post("/v1/fine_tuning/jobs/estimate", json=big).json()["memory"]
    assert planned[0]["changed"] and planned[0]["fits"] and planned[0]["per_gpu_bytes"] <= 40 * gib
    assert planned[0]["step_options"]["lora_dim"] > 0 or planned[0]["step_options"]["zero_stage"] == 3
    assert not planned[1]["changed"]  # the 350M reward model fits as it is
    kept = alice.post(
        "/v1/fine_tuning/jobs/estimate", json=big | {"config": {"sft": {"zero_stage": 3}}}
    ).json()["memory"]
    assert kept[0]["step_options"]["zero_stage"] == 3  # what the request set is kept
    error(
        alice.post("/v1/fine_tuning/jobs/estimate", json=big | {"preset": "/etc/hostname"}), 400, "preset"
    )  # a name
    fixed_big = big | {"memory": "fixed", "model_parameters": 350_000_000, "gpu_type": "A100-80G"}
    one = alice.post("/v1/fine_tuning/jobs/estimate", json=fixed_big | {"hyperparameters": {"batch_size": 1}})
    sixteen = alice.post(
        "/v1/fine_tuning/jobs/estimate", json=fixed_big | {"hyperparameters": {"batch_size": 16}}
    )
    assert one.json()["memory"][0]["per_gpu_bytes"] < sixteen.json()["memory"][0]["per_gpu_bytes"]  # applied
    fixed = error(
        alice.post("/v1/fine_tuning/jobs/estimate", json=big | {"memory": "fixed"}), 400, "gpu_type"
    )
    assert (
        "as configured (ZeRO-0)" in fixed["message"]
        and "fits with" in fixed["message"]
        and "memory: auto" in fixed["message"]
    )
    huge = error(
        alice.post(
            "/v1/fine_tuning/jobs/estimate",
            json=big | {"model_parameters": 175_000_000_000, "gpu_type": "V100-32G"},
        ),
        400,
        "gpu_type",
    )
    assert (
        "host memory" in huge["message"]
        and "the smallest configuration that fits: 4× V100-32G" in huge["message"]
    )
    # a job: micro-batches of 7,000 sequences of 512 tokens do not fit on a V100 as configured
    before = counts(stack)
    sft = SMALL_SFT["config"]["sft"] | {"max_seq_len": 512}
    crowded = SMALL_SFT | {
        "gpu_type": "V100-32G",
        "config": {"sft": sft | {"per_device_train_batch_size": 7000, "gradient_accumulation_steps": 1}},
    }
    error(alice.post("/v1/fine_tuning/jobs", json=crowded | {"memory": "fixed"}), 400, "gpu_type")
    assert counts(stack) == before  # nothing stored
    # batch_size is examples per optimiser step: 7,000 of them run as micro-batches that fit
    crowded = SMALL_SFT | {
        "gpu_type": "V100-32G",
        "hyperparameters": {"batch_size": 7000},
        "config": {"sft": sft},
    }
    job = alice.post("/v1/fine_tuning/jobs", json=crowded).json()
    with session_scope(stack.settings.db_url) as s:
        record = s.get(Job, job["id"])
        assert record is not None
        options, memory = record.plan["1"], record.request["_memory"]["1"]
    assert memory["fits"] and memory["per_gpu_bytes"] <= 32 * gib
    assert options["per_device_train_batch_size"] < 7000  # smaller micro-batches …
    assert (
        options["per_device_train_batch_size"] * options["gradient_accumulation_steps"] == 7000
    )  # … same batch
    assert alice.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200


def test_models_list_base_and_own_fine_tuned(alice: Any, bob: Any) -> None:
    ids = [m["id"] for m in alice.get("/v1/models").json()["data"]]
    assert "tiny-opt-xs" in ids
    assert alice.get("/v1/models/tiny-opt-xs").json()["owned_by"] == "system"
    error(bob.get("/v1/models/ft:tiny-opt-xs::ftjob-nope"), 404)


def _tar(tmp_path: Any, files: dict[str, bytes], *, link: str | None = None) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    return buf.getvalue()


def test_model_upload_is_checked_private_and_usable(
    stack: Stack, alice: Any, bob: Any, base_model: Any, tmp_path: Any
) -> None:
    # the folder as `rlhf models` wrote it, with its own notes (a GGUF conversion's too)
    files = {p.name: p.read_bytes() for p in base_model.iterdir() if p.is_file() and p.suffix != ".md"}
    assert "tiny_model.json" in files
    files["gguf_source.json"] = b'{"file": "m.gguf", "sha256": "00"}'
    archive = _tar(tmp_path, files)
    name = f"my-opt-{stack.settings.db_url[:6].replace(':', '')}"
    up = alice.post("/v1/models", files={"file": ("m.tar.gz", archive)}, data={"name": name}).json()
    assert up == {
        "id": name,
        "object": "model",
        "created": up["created"],
        "owned_by": "alice",
        "ready": True,
        "parent": None,
    }
    assert name in [m["id"] for m in alice.get("/v1/models").json()["data"]]
    assert name not in [m["id"] for m in bob.get("/v1/models").json()["data"]]
    assert alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"model": name}).json()["model"] == name
    error(bob.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"model": name}), 400, "model")
    error(alice.post("/v1/models", files={"file": ("m.tar.gz", archive)}, data={"name": name}), 409, "name")
    # the same directory comes back as an archive
    import io
    import tarfile

    got = alice.get(f"/v1/models/{name}/content")
    assert got.status_code == 200 and got.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tf:
        assert {m.name: tf.extractfile(m).read() for m in tf.getmembers()} == files  # type: ignore[union-attr]
    error(bob.get(f"/v1/models/{name}/content"), 404)
    error(alice.get("/v1/models/tiny-opt-xs/content"), 404)
    # refused archives
    config = files["config.json"]
    bad = [
        ({"config.json": config, "pytorch_model.bin": b"x"}, "pickled"),
        ({"config.json": config, "../model.safetensors": b"x"}, "leaves"),
        ({"config.json": config, "model.safetensors": files["model.safetensors"]}, None),
        (
            {
                "config.json": b'{"model_type": "opt", "architectures": ["OPTForCausalLM"], '
                b'"auto_map": {"a": "b"}}',
                "model.safetensors": b"x",
            },
            "trust_remote_code",
        ),
        ({"model.safetensors": b"x"}, "config.json"),
        ({"config.json": config, "evil.py": b"import os", "model.safetensors": b"x"}, "not a model file"),
    ]
    before = counts(stack)
    for i, (members, words) in enumerate(bad):
        link = "link.json" if words is None else None
        resp = alice.post(
            "/v1/models",
            files={"file": ("m.tar.gz", _tar(tmp_path, members, link=link))},
            data={"name": f"bad-{i}"},
        )
        assert words is None or words in error(resp, 400, "file")["message"], resp.text
        if words is None:
            assert "not a plain file" in error(resp, 400, "file")["message"]
    error(
        alice.post("/v1/models", files={"file": ("m.tar.gz", b"not a tar")}, data={"name": "junk"}),
        400,
        "file",
    )
    assert name not in [m["id"] for m in bob.get("/v1/models").json()["data"]]
    assert counts(stack) == before


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("POST", "/cancel"),
        ("POST", "/pause"),
        ("POST", "/resume"),
        ("GET", "/events"),
        ("GET", "/checkpoints"),
        ("GET", "/metrics"),
        ("GET", "/rollouts"),
    ],
)
def test_another_tenants_job_is_not_found_on_every_route(
    stack: Stack, alice: Any, bob: Any, method: str, suffix: str
) -> None:
    job = alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()
    before = counts(stack)
    error(bob.request(method, f"/v1/fine_tuning/jobs/{job['id']}{suffix}"), 404)
    assert counts(stack) == before
    assert alice.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "queued"  # untouched


def test_a_failed_key_check_forgets_the_key_at_once(stack: Stack) -> None:
    from service.errors import UnauthenticatedError
    from service.services.keys import authenticate, cached_caller, list_keys, revoke_key

    header = "Bearer " + stack.key("dave")
    with session_scope(stack.settings.db_url) as s:
        assert authenticate(session=s, authorization=header, cache_s=60).tenant_id == "dave"
    assert (remembered := cached_caller(header, 60)) is not None and remembered.tenant_id == "dave"
    assert cached_caller(header, 0) is None  # 0: the cache is not consulted
    with session_scope(stack.settings.db_url) as s:
        revoke_key(session=s, key_id=list_keys(session=s, tenant="dave")[0].id)
    with session_scope(stack.settings.db_url) as s, pytest.raises(UnauthenticatedError):
        authenticate(session=s, authorization=header, cache_s=0)  # 0: the database is asked every time
    assert cached_caller(header, 60) is None
    with session_scope(stack.settings.db_url) as s, pytest.raises(UnauthenticatedError):
        authenticate(session=s, authorization=header, cache_s=60)  # a revoked key is never remembered
    assert cached_caller(header, 60) is None


def test_a_model_over_the_operators_limit_is_refused_before_anything_runs(
    make_stack: Callable[..., Stack],
) -> None:
    from rlhf_engine.models.tiny import write_tiny

    small = make_stack(max_model_bytes=1_000_000)  # 1 MB: the xs model's 2 MB of weights are over it
    write_tiny(small.settings.models_dir / "big-base", "opt", "xs")
    with small.client(small.key("limits")) as c:
        before = counts(small)
        e = error(c.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"model": "big-base"}), 400, "model")
        assert (
            e["code"] == "model_too_large"
            and "RLHF_MAX_MODEL_BYTES" in e["message"]
            and "big-base" in e["message"]
        )
        chat = {"model": "big-base", "messages": [{"role": "user", "content": "hi"}]}
        assert error(c.post("/v1/chat/completions", json=chat), 400, "model")["code"] == "model_too_large"
        assert counts(small) == before  # nothing stored, nothing queued


def test_the_smollm2_demo_job_is_accepted_with_its_bundled_models(alice: Any) -> None:
    """`rlhf demo --model smollm2`'s job: SmolLM2 and the small reward model on its tokenizer are bundled
    names (built by a worker on first use, listed as not ready until then) and the preset is valid."""
    from workers.demo import JOBS

    body = JOBS["smollm2"]
    ready = {m["id"]: m["ready"] for m in alice.get("/v1/models").json()["data"]}
    assert ready[body["model"]] is False and ready[body["reward_model"]] is False
    est = alice.post("/v1/fine_tuning/jobs/estimate", json=body)
    assert est.status_code == 200, est.text
    assert est.json()["seconds"] > 0
    error(
        alice.post("/v1/models", files={"file": ("m.tar.gz", b"x")}, data={"name": body["model"]}),
        400,
        "name",
    )


def test_data_files_must_suit_the_method(stack: Stack, alice: Any) -> None:
    """A preference file for a supervised job, an SFT file as a grader job's only data, prompt rows without
    the grader's field: 400 naming the field, nothing stored. A prompt-only file (OpenAI's reinforcement
    rows) runs a grader job's step 3 alone, on the base model."""
    pref = upload(alice, PREF).json()
    sft = upload(
        alice,
        "".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n" for i in range(40)),
        "sft.jsonl",
    ).json()
    rows = [
        {"messages": [{"role": "user", "content": f"What color is the dog {i}?"}], "subject": "dog"}
        for i in range(40)
    ]
    prompts = upload(alice, "".join(json.dumps(r) + "\n" for r in rows), "rft.jsonl").json()
    assert prompts["kind"] == "prompt" and prompts["rows"] == 40
    lacking = upload(
        alice, "".join(json.dumps(r) + "\n" for r in [*rows, {"messages": rows[0]["messages"]}]), "rft2.jsonl"
    ).json()
    graded = {
        "model": "tiny-opt-xs",
        "method": {"type": "reinforcement", "reinforcement": {"grader": SUBJECT}},
    }
    before = counts(stack)
    err = error(
        alice.post("/v1/fine_tuning/jobs", json={"model": "tiny-opt-xs", "training_file": pref["id"]}),
        400,
        "training_file",
    )
    assert "holds preference data" in err["message"] and "needs sft data" in err["message"]
    err = error(
        alice.post("/v1/fine_tuning/jobs", json=graded | {"training_file": sft["id"]}), 400, "prompt_file"
    )
    assert "step 3 needs prompts" in err["message"]
    err = error(
        alice.post("/v1/fine_tuning/jobs", json=graded | {"training_file": lacking["id"]}),
        400,
        "method.reinforcement.grader",
    )
    assert "no field 'subject'" in err["message"] and "row 41 of the prompts" in err["message"], err
    err = error(
        alice.post("/v1/fine_tuning/jobs", json=graded | {"training_file": prompts["id"], "steps": [1, 3]}),
        400,
        "steps",
    )
    assert "prompts only" in err["message"]
    assert counts(stack) == before
    small = {"ppo": {"per_device_generation_batch_size": 2, "per_device_training_batch_size": 8}}
    job = alice.post(
        "/v1/fine_tuning/jobs", json=graded | {"training_file": prompts["id"], "config": small}
    ).json()
    assert job["steps"] == [3] and job["method"]["reinforcement"]["grader"] == SUBJECT, job
    with session_scope(stack.settings.db_url) as s:
        plan = s.get(Job, job["id"]).plan["3"]  # type: ignore[union-attr]
        prompts_path = s.get(File, prompts["id"]).path  # type: ignore[union-attr]
    assert (
        json.loads(plan["grader"]) == SUBJECT
        and plan["algorithm"] == "grpo"
        and plan["samples_per_prompt"] == 4
    )
    assert plan["actor_model_name_or_path"].endswith("tiny-opt-xs") and plan["data"] == [prompts_path]
    assert not plan["critic_model_name_or_path"] and not plan["reward_model_name_or_path"]
    alice.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")


def test_a_server_without_the_built_console_says_how_to_build_it(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.settings import Settings

    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'db'}", console_dir=tmp_path / "none"
    )
    with TestClient(create_app(settings)) as c:
        r = c.get("/ui/")
        assert r.status_code == 404 and "make console" in r.json()["error"]["message"]
        assert c.get("/ui/assets/x.js").status_code == 404


def test_operator_gpu_types_are_planned_and_a_model_not_here_is_planned_by_size(tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from service.db.session import session_scope
    from service.services.keys import create_key
    from service.settings import Settings

    with pytest.raises(ValueError, match="gpu_types: L4-24G has no price"):  # else every estimate of it fails
        Settings(data_dir=tmp_path, gpu_types=["cpu", "L4-24G"])
    # an operator's V100s are the 16 GB variant: the planner plans with the memory they say
    settings = Settings(
        data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'db'}", gpu_memory_gib={"V100-32G": 16}
    )
    with TestClient(create_app(settings)) as c:
        with session_scope(settings.db_url) as s:
            key = create_key(session=s, tenant="ops")[1]
        c.headers["Authorization"] = f"Bearer {key}"
        body = {"model": "facebook/opt-6.7b", "gpu_type": "V100-32G", "steps": [1]}
        hint = c.post("/v1/fine_tuning/jobs/estimate", json=body)
        assert (
            hint.status_code == 400 and "give its size: model_parameters" in hint.json()["error"]["message"]
        )
        sized = c.post(
            "/v1/fine_tuning/jobs/estimate",
            json=body | {"model_parameters": 6_700_000_000, "tokens": {"1": 1_000_000}},
        ).json()
        step = sized["memory"][0]
        assert step["gpu_bytes"] == 16 * 2**30 and step["fits"] and step["per_gpu_bytes"] <= 16 * 2**30
        assert step["changed"]  # 6.7B does not train in full on 16 GiB: the planner's choice


def test_files_as_openai_has_them_purposes_content_expiry_and_filters(
    stack: Stack, alice: Any, bob: Any
) -> None:
    before = counts(stack)
    for purpose in ("batch", "fine-tune-results", "vision"):
        err = error(
            alice.post("/v1/files", files={"file": ("x.jsonl", PREF.encode())}, data={"purpose": purpose}),
            400,
        )
        assert err["param"] == "purpose" and "fine-tune, evals, user_data" in err["message"]
    assert counts(stack) == before  # nothing stored
    raw = b"\x00\x01 any bytes at all"
    blob = alice.post("/v1/files", files={"file": ("notes.bin", raw)}, data={"purpose": "user_data"}).json()
    assert blob["purpose"] == "user_data" and blob["kind"] == "none"
    got = alice.get(f"/v1/files/{blob['id']}/content")
    assert got.status_code == 200 and got.content == raw
    error(bob.get(f"/v1/files/{blob['id']}/content"), 404)  # another tenant's: not found
    ev = alice.post(
        "/v1/files", files={"file": ("ev.jsonl", PREF.encode())}, data={"purpose": "evals"}
    ).json()
    assert ev["purpose"] == "evals" and ev["rows"] == 40  # checked: one JSON object per line
    assert alice.get(f"/v1/files/{ev['id']}/content").text == PREF
    # expires_after, as the SDK sends it (multipart fields)
    form = {"purpose": "fine-tune", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}
    timed = alice.post("/v1/files", files={"file": ("t.jsonl", PREF.encode())}, data=form).json()
    assert timed["expires_at"] - timed["created_at"] in (3599, 3600, 3601)
    short = form | {"expires_after[seconds]": "60"}
    assert (
        error(alice.post("/v1/files", files={"file": ("t.jsonl", PREF.encode())}, data=short), 400)["param"]
        == "expires_after.seconds"
    )
    chats = "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        )
        + "\n"
        for i in range(40)
    )
    used = alice.post("/v1/files", files={"file": ("u.jsonl", chats.encode())}, data=form).json()
    job = alice.post("/v1/fine_tuning/jobs", json=SMALL_SFT | {"training_file": used["id"]}).json()
    assert job["status"] == "queued", job

    def expire(*ids: str) -> None:  # an hour later
        with session_scope(stack.settings.db_url) as s:
            for file_id in ids:
                row = s.get(File, file_id)
                assert row is not None
                row.expires_at = row.created_at - timedelta(seconds=1)

    def purge() -> int:  # what the training worker's sweeper runs
        with session_scope(stack.settings.db_url) as s:
            return files_svc.purge_expired(session=s)

    expire(timed["id"], used["id"])
    error(alice.get(f"/v1/files/{timed['id']}"), 404)
    with session_scope(stack.settings.db_url) as s:
        paths = {i: Path(s.get(File, i).path) for i in (timed["id"], used["id"])}  # type: ignore[union-attr]
    assert purge() == 1 and not paths[timed["id"]].exists()
    assert paths[used["id"]].exists()  # a live job still reads it: it goes when the job ends
    alice.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert purge() == 1 and not paths[used["id"]].exists()
    # list filters: purpose and order
    mine = alice.get("/v1/files", params={"purpose": "user_data"}).json()["data"]
    assert [f["id"] for f in mine] == [blob["id"]]
    newest = [f["id"] for f in alice.get("/v1/files").json()["data"]]
    oldest = [f["id"] for f in alice.get("/v1/files", params={"order": "asc"}).json()["data"]]
    assert oldest == list(reversed(newest)) and timed["id"] not in newest
    page = alice.get("/v1/files", params={"order": "asc", "limit": 1, "after": oldest[0]}).json()
    assert [f["id"] for f in page["data"]] == oldest[1:2]


def test_jobs_list_filters_by_metadata_and_a_validation_file_must_match_the_training_file(
    stack: Stack, alice: Any
) -> None:
    pref = upload(alice, PREF * 2).json()
    sft = upload(
        alice,
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            )
            + "\n"
            for i in range(40)
        ),
        "sft.jsonl",
    ).json()
    body = SMALL_SFT | {"training_file": sft["id"]}
    before = counts(stack)
    err = error(alice.post("/v1/fine_tuning/jobs", json=body | {"validation_file": pref["id"]}), 400)
    assert err["param"] == "validation_file" and "needs sft data" in err["message"]
    dpo = {"model": "tiny-opt-xs", "training_file": pref["id"], "method": {"type": "dpo"}}
    err = error(alice.post("/v1/fine_tuning/jobs", json=dpo | {"validation_file": sft["id"]}), 400)
    assert err["param"] == "validation_file" and "training file's format" in err["message"]
    assert counts(stack) == before
    a = alice.post("/v1/fine_tuning/jobs", json=body | {"metadata": {"team": "red", "n": "1"}}).json()
    b = alice.post("/v1/fine_tuning/jobs", json=body | {"metadata": {"team": "blue"}}).json()
    c = alice.post(
        "/v1/fine_tuning/jobs",
        json=body | {"metadata": {"team": "red", "n": "2"}, "validation_file": sft["id"]},
    ).json()
    assert c["validation_file"] == sft["id"]
    red = alice.get("/v1/fine_tuning/jobs", params={"metadata[team]": "red"}).json()
    assert [j["id"] for j in red["data"]] == [c["id"], a["id"]]
    one = alice.get("/v1/fine_tuning/jobs", params={"metadata[team]": "red", "metadata[n]": "1"}).json()
    assert [j["id"] for j in one["data"]] == [a["id"]]
    paged = alice.get("/v1/fine_tuning/jobs", params={"metadata[team]": "red", "limit": 1}).json()
    assert paged["has_more"] and [j["id"] for j in paged["data"]] == [c["id"]]
    error(alice.get("/v1/fine_tuning/jobs", params={"metadata": "red"}), 400, "metadata")
    for job in (a, b, c):
        alice.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    error(alice.delete("/v1/models/tiny-opt-xs"), 404, "model")  # base models are not deleted
