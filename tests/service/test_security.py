"""Security pass: a revoked key stops working in every API process within a second (Redis pub/sub; the
key cache's expiry is the fallback), and no log line of the API server carries a key."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rlhf_engine.runtime.distributed import free_port
from tests.service.conftest import SMALL_SFT, Stack
from workers.local import wait_healthy

pytestmark = pytest.mark.timeout(120)


def test_a_revoked_key_stops_working_in_every_api_process_within_a_second(
    make_stack: Callable[..., Stack], new_pg: Callable[[], str], new_redis: Callable[[], str], tmp_path: Path
) -> None:
    # keys are trusted for a minute without the database: only the announcement can stop them sooner
    stack = make_stack(database_url=new_pg(), redis_url=new_redis(), auth_cache_s=60)
    env = stack.env | {"RLHF_AUTH_CACHE_S": "60"}
    port = free_port()
    with open(tmp_path / "api.log", "wb") as out:  # a second API process, its own key cache
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "serve", "--port", str(port), "--no-grpc"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        other = f"http://127.0.0.1:{port}"
        assert wait_healthy(other, proc, timeout_s=30), (tmp_path / "api.log").read_text()[-2000:]
        key, keep = stack.key("mallory"), stack.key("alice")
        auth = {"Authorization": f"Bearer {key}"}
        for url in (stack.url, other):  # verified, hence cached, in both processes
            assert httpx.get(f"{url}/v1/files", headers=auth).status_code == 200
        deadline = time.monotonic() + 30
        while _listening(stack.settings.redis_url) < 2:  # both processes have subscribed
            assert time.monotonic() < deadline, "the API processes do not listen for revocations"
            time.sleep(0.05)
        listed = subprocess.run(
            [sys.executable, "-m", "workers.cli", "keys", "list", "--tenant", "mallory"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        key_id = listed.split()[0]
        revoked = subprocess.run(
            [sys.executable, "-m", "workers.cli", "keys", "revoke", key_id],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert "every API process was told at once" in revoked.stdout, revoked.stdout
        told = time.monotonic()
        for url in (stack.url, other):
            while (r := httpx.get(f"{url}/v1/files", headers=auth)).status_code == 200:
                assert time.monotonic() - told < 1.0, f"{url} still accepts a revoked key"
                time.sleep(0.05)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{other}/v1/files", headers={"Authorization": f"Bearer {keep}"}).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert key not in (tmp_path / "api.log").read_text()


def _listening(redis_url: str) -> int:
    """Connections subscribed to a channel on this stack's Redis database (its own: new_redis), i.e. the
    API processes that listen for revocations."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        db = int(client.connection_pool.connection_kwargs.get("db", 0))
        return sum(1 for c in client.client_list() if int(c["db"]) == db and int(c["sub"]) > 0)
    finally:
        client.close()


def test_no_log_line_carries_a_key(
    make_stack: Callable[..., Stack], caplog: pytest.LogCaptureFixture
) -> None:
    """Every logger at DEBUG while keys are used well and badly: neither a key nor its secret part
    appears (the API server runs in this process, so its logs are captured here)."""
    caplog.set_level(logging.DEBUG)
    stack = make_stack()
    key = stack.key("alice")
    secret = key.removeprefix("sk-rlhf-")
    with stack.client(key) as c:
        c.get("/v1/files")
        c.post("/v1/fine_tuning/jobs", json=SMALL_SFT)
        c.post("/v1/fine_tuning/jobs", json={"model": 7})  # 400
        c.post(
            "/v1/chat/completions",
            json={"model": "tiny-opt-xs", "messages": [{"role": "user", "content": "hi"}]},
        )
        c.get("/v1/fine_tuning/jobs/ftjob-nope")  # 404
    httpx.get(f"{stack.url}/v1/files", headers={"Authorization": f"Bearer {key}x"})  # 401, a near miss
    httpx.get(f"{stack.url}/v1/files", headers={"Authorization": key})  # 401, no scheme
    text = caplog.text
    assert len(caplog.records) > 0
    assert key not in text and secret not in text and secret[:12] not in text


ESCAPES = ["../etc", "..", "/etc/passwd", "t/../../x", "ft:../../x", "%2e%2e%2fetc", "models/../../rlhf.db"]


@pytest.mark.parametrize("name", ESCAPES)
def test_path_like_fields_cannot_escape_the_data_directory(
    make_stack: Callable[..., Stack], name: str
) -> None:
    """Every field or path segment that names a stored object is a name, never a path: a traversal or
    an absolute path is refused (400) or not found (404), on every route that takes one."""
    stack = make_stack()
    outside = stack.settings.data_dir.parent / "outside-secret"
    outside.mkdir(exist_ok=True)
    (outside / "config.json").write_text('{"model_type": "opt"}')
    with stack.client(stack.key("alice")) as c:
        answers = [
            c.post("/v1/fine_tuning/jobs", json={"model": name}),
            c.post("/v1/fine_tuning/jobs", json={"model": "tiny-opt-xs", "reward_model": name}),
            c.post("/v1/fine_tuning/jobs", json={"model": "tiny-opt-xs", "training_file": name}),
            c.post("/v1/fine_tuning/jobs", json={"model": str(outside)}),
            c.post(
                "/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}]}
            ),
            c.get(f"/v1/models/{name}"),
            c.get(f"/v1/models/{name}/content"),
            c.get(f"/v1/files/{name}"),
            c.get(f"/v1/fine_tuning/jobs/{name}"),
            c.post("/v1/models", files={"file": ("m.tar.gz", b"not a tar")}, data={"name": name}),
        ]
        for r in answers:
            assert r.status_code in (400, 404), (r.request.method, r.request.url, r.status_code, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert c.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was created


def test_another_tenants_objects_are_not_found_on_every_route_and_rpc(
    make_stack: Callable[..., Stack], base_model: Path
) -> None:
    """Generated from the route table (OpenAPI document) and the gRPC services: every route or method
    that names an object answers 404 / NOT_FOUND to another tenant, and every list leaves it out."""
    import io
    import json
    import tarfile

    import grpc

    from service.grpc.pb import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc

    stack = make_stack()
    alice, bob = stack.key("alice"), stack.key("bob")
    with stack.client(alice) as a:
        pref = "".join(
            json.dumps({"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."}) + "\n" for i in range(40)
        )
        file_id = a.post(
            "/v1/files", files={"file": ("p.jsonl", pref.encode())}, data={"purpose": "fine-tune"}
        ).json()["id"]
        job_id = a.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()["id"]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            for p in base_model.iterdir():
                if p.is_file() and p.suffix != ".md":
                    tf.add(p, arcname=p.name)
        up = a.post("/v1/models", files={"file": ("m.tar.gz", buf.getvalue())}, data={"name": "alices-model"})
        assert up.status_code == 200, up.text
        model_id = up.json()["id"]
        # one checkpoint of alice's job (a step's chat model), shared with carol
        from service.db.models import Job, JobCheckpoint
        from service.db.session import session_scope
        from service.services.checkpoints import model_id as checkpoint_id

        with session_scope(stack.settings.db_url) as s:
            row = JobCheckpoint(
                job_id=job_id, step=1, global_step=5, path=str(base_model), metrics={"loss": 1.0}
            )
            s.add(row)
            s.flush()
            ckpt = checkpoint_id(s.get(Job, job_id), row)  # type: ignore[arg-type]
        stack.key("carol")
        shared = a.post(f"/v1/fine_tuning/checkpoints/{ckpt}/permissions", json={"project_ids": ["carol"]})
        assert shared.status_code == 200, shared.text
        # an eval of alice's, a run of it and one of its output items (written as the evals worker would)
        check = {
            "type": "string_check",
            "name": "c",
            "input": "{{sample.output_text}}",
            "reference": "x",
            "operation": "eq",
        }
        schema = {"type": "object", "properties": {"q": {"type": "string"}}}
        eval_id = a.post(
            "/v1/evals",
            json={
                "data_source_config": {"type": "custom", "item_schema": schema},
                "testing_criteria": [check],
            },
        ).json()["id"]
        run_source = {
            "type": "jsonl",
            "source": {
                "type": "file_content",
                "content": [{"item": {"q": "?"}, "sample": {"output_text": "x"}}],
            },
        }
        run_id = a.post(f"/v1/evals/{eval_id}/runs", json={"data_source": run_source}).json()["id"]
        from service.db.models import EvalOutputItem

        with session_scope(stack.settings.db_url) as s:
            item = EvalOutputItem(
                run_id=run_id, item_index=0, status="pass", datasource_item={"q": "?"}, results=[], sample={}
            )
            s.add(item)
            s.flush()
            item_id = item.id
            # a stored response of alice's (as POST /v1/responses keeps one)
            from service.db.models import StoredResponse

            stored = StoredResponse(
                id="resp_alice",
                tenant_id="alice",
                body={
                    "id": "resp_alice",
                    "created_at": 0,
                    "status": "completed",
                    "model": model_id,
                    "output": [],
                },
                conversation=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                inputs=1,
            )
            s.add(stored)
        ids = {
            "file_id": file_id,
            "job_id": job_id,
            "model_id": model_id,
            "fine_tuned_model_checkpoint": ckpt,
            "permission_id": shared.json()["data"][0]["id"],
            "eval_id": eval_id,
            "run_id": run_id,
            "output_item_id": item_id,
            "response_id": "resp_alice",
        }
        doc = a.get("/openapi.json").json()
        own = {
            path: a.request(method, path.format(**ids)).status_code
            for path, ops in doc["paths"].items()
            for method in ops
            if "{" in path and method == "get"
        }
        assert all(code == 200 for code in own.values()), own  # alice sees her objects on every such route
    checked = []
    with stack.client(bob) as b:
        for path, ops in doc["paths"].items():
            if "{" not in path:
                continue
            for method in ops:
                body: dict[str, Any] | None = {} if method in ("post", "put", "patch") else None
                if body is not None and path.endswith(
                    "/permissions"
                ):  # a valid body: the id is what is refused
                    body = {"project_ids": ["bob"]}
                if body is not None and path.endswith("/runs"):
                    body = {"data_source": run_source}
                r = b.request(method, path.format(**ids), json=body)
                assert r.status_code == 404, (method, path, r.status_code, r.text)
                checked.append(f"{method.upper()} {path}")
        lists = {
            "/v1/files": file_id,
            "/v1/fine_tuning/jobs": job_id,
            "/v1/models": model_id,
            "/v1/evals": eval_id,
        }
        for path, hidden in lists.items():
            assert hidden not in [o["id"] for o in b.get(path).json()["data"]], path
        chat = b.post(
            "/v1/chat/completions", json={"model": model_id, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 404, chat.text
    assert len(checked) >= 11, checked

    with grpc_channel(stack) as ch:
        jobs, models = jobs_pb2_grpc.JobServiceStub(ch), models_pb2_grpc.ModelServiceStub(ch)
        md = [("authorization", f"Bearer {bob}")]
        named = 0
        for module, stub, object_id in ((jobs_pb2, jobs, job_id), (models_pb2, models, model_id)):
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:  # every RPC whose request names an object by id
                    if "id" not in method.input_type.fields_by_name:
                        continue
                    req = getattr(module, method.input_type.name)(id=object_id)
                    with pytest.raises(grpc.RpcError) as e:
                        reply = getattr(stub, method.name)(req, metadata=md)
                        if method.server_streaming:
                            next(iter(reply))
                    assert e.value.code() == grpc.StatusCode.NOT_FOUND, method.name
                    named += 1
        assert named >= 10
        assert job_id not in [
            j.id for j in jobs.ListJobs(jobs_pb2.ListJobsRequest(limit=100), metadata=md).data
        ]
        assert model_id not in [
            m.id for m in models.ListModels(models_pb2.ListModelsRequest(), metadata=md).data
        ]


@contextlib.contextmanager
def grpc_channel(stack: Stack) -> Iterator[Any]:
    """The stack's gRPC server, started on a free loopback port in a loop of its own, and a channel to it."""
    import asyncio
    import threading

    import grpc

    from service.grpc.server import start_server

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server, port = asyncio.run_coroutine_threadsafe(
        start_server(stack.settings, host="127.0.0.1", port=0), loop
    ).result(30)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


def test_a_fine_tuned_model_a_live_job_uses_is_not_deleted_and_grpc_lists_jobs_by_metadata(
    make_stack: Callable[..., Stack], base_model: Path, tmp_path: Path
) -> None:
    import shutil

    import grpc

    from service.db.models import FineTunedModel, Job
    from service.db.session import session_scope
    from service.grpc.pb import jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc

    stack = make_stack()
    key = stack.key("dora")
    weights = shutil.copytree(base_model, tmp_path / "ft")
    with stack.client(key) as c:
        first = c.post("/v1/fine_tuning/jobs", json=SMALL_SFT).json()
        ft = f"ft:tiny-opt-xs:x:{first['id']}"
        with session_scope(stack.settings.db_url) as s:
            s.add(FineTunedModel(id=ft, tenant_id="dora", job_id=first["id"], path=str(weights)))
        live = c.post(
            "/v1/fine_tuning/jobs", json=SMALL_SFT | {"model": ft, "metadata": {"team": "x"}}
        ).json()
        assert live["status"] == "queued", live
        refused = c.delete(f"/v1/models/{ft}")
        assert refused.status_code == 400 and live["id"] in refused.json()["error"]["message"], refused.text
        assert (weights / "config.json").is_file()  # nothing deleted
    with grpc_channel(stack) as ch:
        jobs, models = jobs_pb2_grpc.JobServiceStub(ch), models_pb2_grpc.ModelServiceStub(ch)
        md = [("authorization", f"Bearer {key}")]
        listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(metadata={"team": "x"}), metadata=md).data
        assert [j.id for j in listed] == [live["id"]]
        assert not jobs.ListJobs(jobs_pb2.ListJobsRequest(metadata={"team": "y"}), metadata=md).data
        with pytest.raises(grpc.RpcError) as e:
            models.DeleteModel(models_pb2.GetModelRequest(id=ft), metadata=md)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        jobs.CancelJob(jobs_pb2.GetJobRequest(id=live["id"]), metadata=md)
        assert models.DeleteModel(models_pb2.GetModelRequest(id=ft), metadata=md).deleted
    assert not weights.exists()
    with session_scope(stack.settings.db_url) as s:
        assert (
            s.get(FineTunedModel, ft) is None and s.get(Job, live["id"]) is not None
        )  # the job's record stays


def test_a_chat_request_reaches_the_worker_scoped_to_its_tenant() -> None:
    """Workers reuse cached prompt keys/values only within a scope; the API sends the caller's tenant as
    that scope (both routing paths, the database's and its cached view, pick through `_pick`), so one
    tenant's prompts never shorten another's prefill (a time-to-first-token side channel on shared base
    models)."""
    from service.schemas import ChatCompletionRequest, ChatMessage
    from service.services import chat
    from service.services.models import ModelRef

    ref = ModelRef(name="tiny-opt-m", path=Path("/models/tiny-opt-m"), base="tiny-opt-m", key="tiny-opt-m")
    worker = chat.WorkerView(
        id="w1",
        address="127.0.0.1:1",
        models=("tiny-opt-m",),
        adapters=(),
        active=0,
        capacity=4,
        max_models=2,
    )
    req = ChatCompletionRequest(model="tiny-opt-m", messages=[ChatMessage(role="user", content="hi")])
    for tenant in ("tenant-a", "tenant-b"):
        route = chat._pick(ref, [worker], chat.Settings(), {}, tenant)
        assert chat._generate_request(route, req).cache_scope == tenant
