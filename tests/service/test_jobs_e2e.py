"""Jobs end to end: real API server, PostgreSQL, Redis and a real Celery training worker running the
DeepSpeed steps as child processes. One finished 3-step tiny job serves most assertions.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.db.models import CostInterval, FineTunedModel, Job
from service.db.session import session_scope
from service.services.cost import price
from tests.service.conftest import SMALL_SFT, Stack, events, wait_for, wait_for_training


@pytest.fixture(scope="module")
def stack(e2e_stack: Stack) -> Stack:
    return e2e_stack


@pytest.fixture(scope="module")
def client(e2e_client: httpx.Client) -> httpx.Client:
    return e2e_client


@pytest.fixture(scope="module")
def finished(e2e_finished: dict[str, Any]) -> dict[str, Any]:
    return e2e_finished


def test_three_step_job_succeeds_with_its_record(
    client: httpx.Client, finished: dict[str, Any], walk: Any
) -> None:
    job = finished["job"]
    assert job["step_status"] == {"1": "succeeded", "2": "succeeded", "3": "succeeded"}
    assert job["fine_tuned_model"] == f"ft:tiny-opt-xs:e2e:{job['id']}"
    assert job["progress"] == 1.0 and job["trained_tokens"] > 0 and job["error"] is None
    types = [e["data"]["event_type"] for e in events(client, job["id"])]
    for t in (
        "job_created",
        "job_started",
        "step_started",
        "checkpoint_saved",
        "eval",
        "step_finished",
        "step_succeeded",
        "job_succeeded",
    ):
        assert t in types, t
    assert types.count("step_started") == 3
    # the stack's model root was empty: the job said it built its base model, and when it was ready
    assert types.index("preparing_model") < types.index("model_ready") < types.index("step_started")
    series = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"step": 3}).json()["data"]
    assert [p["global_step"] for p in series] == list(range(1, 13))
    assert {"reward_mean", "kl_to_ref", "actor_loss", "critic_loss"} <= set(series[0]["values"])
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 50}).json()["data"]
    assert {c["step"] for c in ckpts} == {1, 2, 3}
    assert all(c["object"] == "fine_tuning.job.checkpoint" and c["step_number"] > 0 for c in ckpts)
    for step in (1, 2, 3):  # every step's final model is listed too, at its last step, with its last metrics
        last = walk(client, f"/v1/fine_tuning/jobs/{job['id']}/metrics", 1000, step=step)[-1]
        final = [c for c in ckpts if c["step"] == step and c["metrics"].get("final")]
        assert len(final) == 1 and final[0]["step_number"] == last["global_step"], (step, final)
        assert (
            final[0]["metrics"]["loss" if step < 3 else "reward_mean"]
            == last["values"]["loss" if step < 3 else "reward_mean"]
        )
    for step in (
        1,
        2,
        3,
    ):  # each step's measured peak memory beside the planned one, on its last metric point
        last = walk(client, f"/v1/fine_tuning/jobs/{job['id']}/metrics", 1000, step=step)[-1]["values"]
        assert last["peak_memory_mib"] > 0 and last["planned_peak_mib"] > 0, last
    said = [e["message"] for e in events(client, job["id"]) if e["data"]["event_type"] == "step_succeeded"]
    # a CPU's resident set is named as such, never set beside the planned tensor bytes as if alike
    assert len(said) == 3 and all(
        "peak resident memory" in m and "ru_maxrss" in m and "counts tensors only" in m for m in said
    ), said
    rollouts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/rollouts", params={"limit": 3}).json()
    assert len(rollouts["data"]) == 3 and {"id", "prompt", "answer", "reward"} <= set(rollouts["data"][0])
    # every list pages one way: `after` = the previous page's last id
    whole = client.get(f"/v1/fine_tuning/jobs/{job['id']}/rollouts", params={"limit": 100}).json()["data"]
    assert [r["id"] for r in whole] == list(range(1, len(whole) + 1)) and len(whole) > 4
    assert walk(client, f"/v1/fine_tuning/jobs/{job['id']}/rollouts", 4) == whole
    assert walk(client, f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", 1) == ckpts
    assert walk(client, f"/v1/fine_tuning/jobs/{job['id']}/metrics", 5, step=3) == series


def test_a_job_writes_tensorboard_and_its_step_logs_show_progress(
    finished: dict[str, Any], stack: Stack
) -> None:
    """What a person watching the job's run folder sees: each step's TensorBoard events and a step log
    filled line by line with its progress (the worker's step processes are piped, not on a terminal)."""
    from service.db.models import Job
    from service.db.session import session_scope

    with session_scope(stack.settings.db_url) as s:
        out = Path(s.get(Job, finished["job"]["id"]).output_dir)  # type: ignore[union-attr]
    for name, title in (
        ("step1_sft", "step 1 (SFT)"),
        ("step2_reward", "step 2 (reward model)"),
        ("step3_rlhf", "step 3 (PPO)"),
    ):
        assert list((out / name / "tensorboard").glob("events.out.tfevents.*")), name
        log = (out / "logs" / f"{name}.log").read_text()
        assert re.search(rf"{re.escape(title)}: step (\d+)/\1 \(100%\)", log), log[-1500:]


def test_finished_models_are_listed_and_load(
    client: httpx.Client, finished: dict[str, Any], stack: Stack
) -> None:
    from transformers import AutoModelForCausalLM

    job = finished["job"]
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    main = job["fine_tuned_model"]
    assert {main, f"{main}:ema", f"{main}:sft"} <= set(ids)
    with session_scope(stack.settings.db_url) as s:
        path = s.get(FineTunedModel, main).path  # type: ignore[union-attr]
    assert path.endswith("step3_rlhf/actor")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "opt"
    with stack.client(stack.key("someone-else")) as other:
        assert main not in [m["id"] for m in other.get("/v1/models").json()["data"]]
        assert other.get(f"/v1/models/{main}/content").status_code == 404
    import io
    import tarfile

    archive = client.get(f"/v1/models/{main}/content")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tf:
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(tf.getnames())


def test_cancelling_a_running_job_stops_its_step(
    client: httpx.Client, stack: Stack, finished: dict[str, Any]
) -> None:
    body = SMALL_SFT | {"config": {"sft": {"max_steps": 3000, "checkpoint_interval": 0, "eval_max_rows": 16}}}
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    wait_for_training(client, job["id"])
    # an operator's Prometheus sees the running job's step, speed and loss (read from the database)
    with stack.client(stack.key("ops", operator=True)) as ops:
        scraped = ops.get("/metrics").text
    mine = {
        name: (dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value))
        for name, labels, value in re.findall(r"^(rlhf_job_\w+)\{([^}]*)\} (\S+)$", scraped, flags=re.M)
        if f'job="{job["id"]}"' in labels
    }
    assert mine["rlhf_job_step"][1] == 1.0, scraped[-3000:]
    for gauge in ("global_step", "samples_per_s", "loss"):
        labels, value = mine[f"rlhf_job_{gauge}"]
        assert labels["step"] == "1" and labels["tenant"] and value > 0, (gauge, labels, value)
    assert client.post(f"{url}/cancel").json()["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while "step_killed" not in [e["data"]["event_type"] for e in events(client, job["id"])]:
        assert time.monotonic() < deadline, "the step was not stopped"
        time.sleep(0.3)
    with session_scope(stack.settings.db_url) as s:
        out = s.get(Job, job["id"]).output_dir  # type: ignore[union-attr]
    import subprocess

    assert subprocess.run(["pgrep", "-f", out], capture_output=True).returncode == 1  # no step process left
    n = len(client.get(f"{url}/metrics", params={"limit": 10000}).json()["data"])
    assert 0 < n < 3000
    assert client.get(url).json()["status"] == "cancelled"


def test_estimate_was_given_and_within_2x_of_the_actual_time(finished: dict[str, Any]) -> None:
    created, job = finished["created"], finished["job"]
    assert created["estimated_finish"] is not None
    estimated = created["estimated_finish"] - created["created_at"]
    actual = job["finished_at"] - job["created_at"]
    assert actual / 2 <= estimated <= actual * 2, (estimated, actual)


def test_accrued_cost_is_the_sum_of_intervals_times_price(finished: dict[str, Any], stack: Stack) -> None:
    job = finished["job"]
    with session_scope(stack.settings.db_url) as s:
        rows = s.scalars(select(CostInterval).where(CostInterval.job_id == job["id"])).all()
        keys = [(r.step, r.attempt, r.interval) for r in rows]
        record = s.get(Job, job["id"])
        assert record is not None
    assert len(keys) == len(set(keys)) > 3
    seconds = sum(r.seconds for r in rows)
    assert job["cost"]["accrued_usd"] == pytest.approx(seconds * price("cpu") / 3600, rel=1e-6, abs=1e-6)
    assert job["cost"]["gpu_seconds"] == pytest.approx(seconds, rel=1e-3)
    wall = (record.finished_at - record.started_at).total_seconds()  # type: ignore[operator]
    assert 0.5 * wall <= seconds <= wall + 1


def test_live_events_stream_over_sse(client: httpx.Client, finished: dict[str, Any]) -> None:
    job_id = finished["job"]["id"]
    lines = []
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
    assert lines[-1] == "[DONE]"
    first = json.loads(lines[0])
    assert first["object"] == "fine_tuning.job.event" and first["data"]["event_type"] == "job_created"
    assert json.loads(lines[-2])["data"]["event_type"] == "job_succeeded"


def test_event_stream_with_metrics_carries_every_point_then_the_job(
    client: httpx.Client, finished: dict[str, Any], walk: Any
) -> None:
    """`metrics=true` (what the console draws from): the plain stream's events unnamed as before, each metric
    point as `event: metric`, the job as it ended as `event: job`, then [DONE]."""
    job_id = finished["job"]["id"]
    kinds: list[tuple[str, Any]] = []
    with client.stream(
        "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true", "metrics": "true"}
    ) as r:
        name = "message"
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                kinds.append((name, line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])))
                name = "message"
    assert (
        kinds[-1] == ("message", "[DONE]") and kinds[-2][0] == "job" and kinds[-2][1]["status"] == "succeeded"
    )
    points = [d for k, d in kinds if k == "metric"]
    assert points == walk(client, f"/v1/fine_tuning/jobs/{job_id}/metrics", 1000)  # all of them, in order
    assert [d["data"]["event_type"] for k, d in kinds if k == "message" and d != "[DONE]"][
        -1
    ] == "job_succeeded"
    bad = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"metrics": "true"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metrics"


def test_openai_sdk_creates_retrieves_lists_and_cancels(
    stack: Stack, finished: dict[str, Any], tmp_path: Any
) -> None:
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key("e2e"), max_retries=0)
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"What is {i}?"},
                        {"role": "assistant", "content": f"It is {i}."},
                    ]
                }
            )
            + "\n"
            for i in range(64)
        )
    )
    f = sdk.files.create(file=data.open("rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.bytes == data.stat().st_size
    job = sdk.fine_tuning.jobs.create(
        model="tiny-opt-xs",
        training_file=f.id,
        suffix="sdk",
        seed=3,
        extra_body={"preset": "tiny", "config": {"sft": {"max_steps": 400}}},
    )
    assert job.status == "queued" and job.training_file == f.id and job.seed == 3
    assert sdk.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.id in [j.id for j in sdk.fine_tuning.jobs.list(limit=10).data]
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    done = finished["job"]["id"]
    evs = sdk.fine_tuning.jobs.list_events(done, limit=5)
    assert len(evs.data) == 5 and evs.has_more
    ckpts = sdk.fine_tuning.jobs.checkpoints.list(done)
    assert ckpts.data and ckpts.data[0].fine_tuning_job_id == done
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-nope")


def test_pause_checkpoints_and_resume_continues(client: httpx.Client, finished: dict[str, Any]) -> None:
    body = SMALL_SFT | {"config": {"sft": {"max_steps": 300, "checkpoint_interval": 0, "eval_max_rows": 16}}}
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    wait_for_training(client, job["id"])
    assert client.post(f"{url}/pause").json()["status"] == "running"  # asked; the step checkpoints first
    paused = wait_for(client, job["id"], ("paused", "succeeded", "failed"), timeout=120)
    assert paused["status"] == "paused", paused
    ckpts = client.get(f"{url}/checkpoints").json()["data"]
    assert len(ckpts) == 1 and 0 < ckpts[0]["step_number"] < 300
    at = ckpts[0]["step_number"]
    assert client.post(f"{url}/resume").json()["status"] == "queued"
    done = wait_for(client, job["id"], ("succeeded", "failed"), timeout=180)
    assert done["status"] == "succeeded", done
    steps = [p["global_step"] for p in client.get(f"{url}/metrics", params={"limit": 1000}).json()["data"]]
    assert steps == list(range(1, 301))
    msgs = [e["message"] for e in events(client, job["id"])]
    assert any(f"resuming at step {at}" in m for m in msgs)


def test_budget_cap_pauses_the_job(client: httpx.Client, stack: Stack, finished: dict[str, Any]) -> None:
    cap = 12 * price("cpu") / 3600  # 12 CPU-seconds
    body = SMALL_SFT | {"max_cost_usd": cap, "config": {"sft": {"max_steps": 2000, "checkpoint_interval": 0}}}
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    paused = wait_for(client, job["id"], ("paused", "succeeded", "failed"), timeout=150)
    assert paused["status"] == "paused", paused
    interval = stack.settings.cost_interval_s * price("cpu") / 3600
    assert paused["cost"]["accrued_usd"] <= cap + interval + 1e-9
    assert any(e["data"]["event_type"] == "budget_reached" for e in events(client, job["id"]))
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume")
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_cost_usd"
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")


def test_a_dpo_job_runs_sft_then_dpo_and_registers_the_dpo_model(
    client: httpx.Client, stack: Stack, finished: dict[str, Any]
) -> None:
    """`method: {type: dpo, dpo: {sft_first: true, hyperparameters: {beta}}}` (DeepSpeed-Chat's order)
    through the real stack: step 1, then `rlhf dpo` on its output; the job's model is the DPO model, its
    events, metrics and checkpoints as for any job. (OpenAI's order, DPO of the given model: the port
    test.)"""
    body = {
        "model": "tiny-opt-xs",
        "preset": "tiny",
        "suffix": "dpo",
        "method": {"type": "dpo", "dpo": {"sft_first": True, "hyperparameters": {"beta": 0.3}}},
        "config": {"sft": {"max_steps": 60}, "dpo": {"max_steps": 40, "checkpoint_interval": 20}},
    }
    estimate = client.post("/v1/fine_tuning/jobs/estimate", json=body).json()
    assert [s["step"] for s in estimate["steps"]] == [1, 2] and estimate["usd"] > 0
    created = client.post("/v1/fine_tuning/jobs", json=body).json()
    assert created["method"]["type"] == "dpo" and created["steps"] == [1, 2], created
    assert created["method"]["dpo"]["hyperparameters"]["beta"] == 0.3
    job = wait_for(client, created["id"], ("succeeded", "failed", "cancelled"), timeout=240)
    assert job["status"] == "succeeded", job
    assert job["step_status"] == {"1": "succeeded", "2": "succeeded"}
    main = job["fine_tuned_model"]
    with session_scope(stack.settings.db_url) as s:
        paths = {
            m.id: m.path for m in s.scalars(select(FineTunedModel).where(FineTunedModel.job_id == job["id"]))
        }
        out = Path(s.get(Job, job["id"]).output_dir)  # type: ignore[union-attr]
    assert paths[main].endswith("step2_dpo") and paths[f"{main}:sft"].endswith("step1_sft")
    assert main in [m["id"] for m in client.get("/v1/models").json()["data"]]
    import yaml

    ran_with = yaml.safe_load((out / "configs" / "step2_dpo.yaml").read_text())
    assert ran_with["beta"] == 0.3 and ran_with["model_name_or_path"] == str(out / "step1_sft")
    series = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"step": 2, "limit": 100}).json()[
        "data"
    ]
    assert [p["global_step"] for p in series] == list(range(1, 41))
    assert {"loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"} <= set(
        series[0]["values"]
    )
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 50}).json()["data"]
    assert any(c["step"] == 2 and c["step_number"] == 20 for c in ckpts)
    assert any(c["step"] == 2 and c["metrics"].get("final") and c["step_number"] == 40 for c in ckpts)
    types = [e["data"]["event_type"] for e in events(client, job["id"])]
    assert types.count("step_succeeded") == 2 and "job_succeeded" in types


def test_a_grader_job_runs_sft_then_grpo_on_the_prompts(
    client: httpx.Client, stack: Stack, finished: dict[str, Any]
) -> None:
    """OpenAI's `method: {type: reinforcement, reinforcement: {grader}}` through the real stack: step 1 on the
    bundled data, then GRPO on bundled:questions with the grader as the reward (no reward model trained);
    each answer's grade is in the rollouts and each part's mean in the metrics."""
    grader = {
        "type": "string_check",
        "name": "names_subject",
        "operation": "ilike",
        "input": "{{sample.output_text}}",
        "reference": "{{item.subject}}",
    }
    body = {
        "model": "tiny-opt-xs",
        "preset": "tiny",
        "suffix": "graded",
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader}},
        "config": {
            "sft": {"max_steps": 60},
            "ppo": {"max_steps": 20, "checkpoint_interval": 10, "eval_max_rows": 32},
        },
    }
    estimate = client.post("/v1/fine_tuning/jobs/estimate", json=body).json()
    assert [s["step"] for s in estimate["steps"]] == [1, 3] and estimate["usd"] > 0
    created = client.post("/v1/fine_tuning/jobs", json=body).json()
    assert created["steps"] == [1, 3] and created["method"]["reinforcement"]["grader"] == grader, created
    job = wait_for(client, created["id"], ("succeeded", "failed", "cancelled"), timeout=240)
    assert job["status"] == "succeeded", job
    assert job["step_status"] == {"1": "succeeded", "3": "succeeded"}
    with session_scope(stack.settings.db_url) as s:
        paths = {
            m.id: m.path for m in s.scalars(select(FineTunedModel).where(FineTunedModel.job_id == job["id"]))
        }
        out = Path(s.get(Job, job["id"]).output_dir)  # type: ignore[union-attr]
    assert paths[job["fine_tuned_model"]].endswith("step3_rlhf/actor") and not (out / "step2_reward").exists()
    summary = json.loads((out / "step3_rlhf" / "summary.json").read_text())
    assert summary["algorithm"] == "grpo" and summary["engines"] == {"actor": 1, "ref": 1, "actor_ema": 1}
    series = client.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"step": 3, "limit": 100}).json()[
        "data"
    ]
    assert [p["global_step"] for p in series] == list(range(1, 21))
    assert all(p["values"]["grader_names_subject"] == p["values"]["reward_mean"] for p in series)
    rollouts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/rollouts", params={"limit": 100}).json()["data"]
    assert rollouts and all(r["grades"] == {"names_subject": r["reward"]} for r in rollouts)
    ckpts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 50}).json()["data"]
    assert any(c["step"] == 3 and c["step_number"] == 10 for c in ckpts)


def test_a_grader_job_pauses_and_resumes_in_step_3(client: httpx.Client, finished: dict[str, Any]) -> None:
    """Pause and resume work for grader jobs as for any: step 3 (GRPO, no SFT: steps [3] runs on the base
    model) checkpoints on pause and continues from there, its metrics one unbroken series."""
    grader = {
        "type": "string_check",
        "operation": "ilike",
        "input": "{{sample.output_text}}",
        "reference": "{{item.subject}}",
    }
    body = {
        "model": "tiny-opt-xs",
        "preset": "tiny",
        "steps": [3],
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader}},
        "config": {"ppo": {"max_steps": 150, "checkpoint_interval": 0, "eval_max_rows": 16}},
    }
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    assert job["steps"] == [3], job
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    wait_for_training(client, job["id"])
    assert client.post(f"{url}/pause").json()["status"] == "running"
    paused = wait_for(client, job["id"], ("paused", "succeeded", "failed"), timeout=120)
    assert paused["status"] == "paused", paused
    at = client.get(f"{url}/checkpoints").json()["data"][0]["step_number"]
    assert 0 < at < 150
    assert client.post(f"{url}/resume").json()["status"] == "queued"
    done = wait_for(client, job["id"], ("succeeded", "failed"), timeout=180)
    assert done["status"] == "succeeded", done
    points = client.get(f"{url}/metrics", params={"limit": 1000}).json()["data"]
    assert [p["global_step"] for p in points] == list(range(1, 151))
    assert all("grader_string_check" in p["values"] for p in points)
    assert any(f"resuming at step {at}" in e["message"] for e in events(client, job["id"]))


def test_a_dpo_job_pauses_and_resumes_in_its_dpo_step(client: httpx.Client, finished: dict[str, Any]) -> None:
    """Pause in step 2 (DPO, of the given model) of a dpo job: it checkpoints, resumes from there, one
    unbroken series."""
    body = {
        "model": "tiny-opt-xs",
        "preset": "tiny",
        "method": {"type": "dpo"},
        "config": {
            "dpo": {"max_steps": 400, "num_train_epochs": 2, "checkpoint_interval": 0, "eval_max_rows": 16},
        },
    }
    job = client.post("/v1/fine_tuning/jobs", json=body).json()
    url = f"/v1/fine_tuning/jobs/{job['id']}"
    deadline = time.monotonic() + 180
    while not client.get(f"{url}/metrics", params={"step": 2, "limit": 1}).json()["data"]:
        assert time.monotonic() < deadline, "the DPO step did not start"
        time.sleep(0.2)
    assert client.post(f"{url}/pause").json()["status"] == "running"
    paused = wait_for(client, job["id"], ("paused", "succeeded", "failed"), timeout=120)
    assert paused["status"] == "paused" and paused["step_status"] == {"2": "paused"}, paused
    at = [c for c in client.get(f"{url}/checkpoints").json()["data"] if c["step"] == 2][0]["step_number"]
    assert 0 < at < 400
    assert client.post(f"{url}/resume").json()["status"] == "queued"
    done = wait_for(client, job["id"], ("succeeded", "failed"), timeout=180)
    assert done["status"] == "succeeded", done
    points = client.get(f"{url}/metrics", params={"step": 2, "limit": 1000}).json()["data"]
    assert [p["global_step"] for p in points] == list(range(1, 401))
    assert any(f"resuming at step {at}" in e["message"] for e in events(client, job["id"]))
