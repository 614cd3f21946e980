"""LoRA adapters as models, end to end: a LoRA job on a frozen base registers an adapter model served on
the shared base; tenants upload PEFT adapter folders for a base we serve; one inference worker holds the
base once and decodes every adapter's requests (and the base's) in one batch — each reply what the merged
model gives; a tenant's adapter never answers another tenant; bad adapters are refused naming the file;
an adapter's base cannot be deleted under it; an uploaded adapter is served, not trained from."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.helpers.adapters import greedy, make_adapter
from tests.service.conftest import Stack, Workers, wait_for

pytestmark = pytest.mark.slow
BASE = "tiny-adapted"  # placed in the model root as an operator would
QUESTIONS = ["What is a dog?", "Tell me about the kite.", "Where does the owl live?", "Why is the sky blue?"]
NEW = 12


def tar_of(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted(folder.iterdir()):
            tf.add(f, arcname=f.name)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(e2e_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from rlhf_engine.models.tiny import build_tiny

    base = e2e_stack.settings.models_dir / BASE
    shutil.copytree(build_tiny("llama", "xs"), base, dirs_exist_ok=True)
    workers = Workers(e2e_stack, tmp_path_factory.mktemp("adapters-inference"))
    pid = workers.start()
    keys = {t: e2e_stack.key(t) for t in ("lora-a", "lora-b")}
    yield {
        "base": base,
        "workers": workers,
        "pid": pid,
        "sdk": {
            t: OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=k, timeout=120, max_retries=0)
            for t, k in keys.items()
        },
        "http": {
            t: httpx.Client(base_url=e2e_stack.url, headers={"Authorization": f"Bearer {k}"}, timeout=120)
            for t, k in keys.items()
        },
        "tmp": tmp_path_factory.mktemp("adapters"),
    }
    workers.stop()


def upload(http: httpx.Client, name: str, archive: bytes, **form: str) -> httpx.Response:
    return http.post("/v1/models", data={"name": name, **form}, files={"file": ("a.tar.gz", archive)})


def reply(sdk: OpenAI, model: str, q: str) -> str:
    deadline = time.monotonic() + 120
    while True:  # the worker loads the base on its first request
        try:
            out = sdk.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": q}],
                temperature=0,
                max_tokens=NEW,
            )
            return out.choices[0].message.content or ""
        except Exception as e:
            if "model_not_ready" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def expected(model: Any, base: Path, q: str) -> str:
    """What the merged model says (its own greedy tokens, one full forward per token), as text."""
    from transformers import AutoTokenizer

    from rlhf_engine.data.formatter import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(base))
    ids = greedy(model, encode_prompt([{"role": "user", "content": q}], tok), NEW, eos={tok.eos_token_id})
    return str(tok.decode(ids, skip_special_tokens=True))


@pytest.fixture(scope="module")
def uploaded(served: dict[str, Any]) -> dict[str, Any]:
    """Each tenant uploads an adapter called `my-lora` for the same base (different weights)."""
    merged = {}
    for i, tenant in enumerate(("lora-a", "lora-b")):
        folder = served["tmp"] / f"up-{tenant}"
        merged[tenant] = make_adapter(served["base"], folder, seed=10 + i, rank=4, scale=3.0)
        r = upload(served["http"][tenant], "my-lora", tar_of(folder))
        assert r.status_code == 200, r.text
        assert r.json()["parent"] == BASE
    return merged


def test_uploaded_adapters_answer_as_their_merged_models_batched_on_one_base(
    served: dict[str, Any], uploaded: dict[str, Any]
) -> None:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(served["base"])).eval()
    want = {
        (t, q): expected(uploaded[t] if t != "base" else plain, served["base"], q)
        for t in ("lora-a", "lora-b", "base")
        for q in QUESTIONS
    }
    assert want[("lora-a", QUESTIONS[0])] != want[("base", QUESTIONS[0])]  # the adapters change replies
    reply(served["sdk"]["lora-a"], "my-lora", QUESTIONS[0])  # base and adapter loaded
    jobs = [(t, q) for t in ("lora-a", "lora-b", "base") for q in QUESTIONS]

    def run(job: tuple[str, str]) -> str:
        tenant, q = job
        sdk = served["sdk"]["lora-a" if tenant == "base" else tenant]
        return reply(sdk, BASE if tenant == "base" else "my-lora", q)

    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: one continuous batch on the worker
        got = dict(zip(jobs, pool.map(run, jobs), strict=True))
    assert got == want  # each tenant's `my-lora` is its own adapter, never the other's
    row = served["workers"].row(served["pid"])
    assert row is not None and row.models == [BASE] and len(row.adapters) == 2, (row.models, row.adapters)
    listed = {m["id"]: m for m in served["http"]["lora-b"].get("/v1/models").json()["data"]}
    assert listed["my-lora"]["parent"] == BASE and listed[BASE]["parent"] is None


def test_another_tenants_adapter_is_not_found(served: dict[str, Any], uploaded: dict[str, Any]) -> None:
    folder = served["tmp"] / "only-a"
    make_adapter(served["base"], folder, seed=30)
    assert upload(served["http"]["lora-a"], "a-only", tar_of(folder)).status_code == 200
    r = served["http"]["lora-b"].post(
        "/v1/chat/completions", json={"model": "a-only", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert served["http"]["lora-b"].get("/v1/models/a-only").status_code == 404


def test_bad_adapters_are_refused_naming_the_file_and_nothing_is_registered(served: dict[str, Any]) -> None:
    from rlhf_engine.models.tiny import build_tiny

    http, tmp = served["http"]["lora-a"], served["tmp"]
    good = tmp / "good"
    make_adapter(served["base"], good, seed=40, rank=4)

    def variant(name: str, change: Any) -> bytes:
        folder = tmp / name
        shutil.copytree(good, folder)
        change(folder)
        return tar_of(folder)

    def config(folder: Path, **values: Any) -> None:
        data = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(data | values))

    other = tmp / "other-base"
    make_adapter(build_tiny("opt", "xs"), other, seed=41)
    config(other, base_model_name_or_path=BASE)

    def pickled(folder: Path) -> None:
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")

    def tokenizer(folder: Path) -> None:
        data = json.loads((served["base"] / "tokenizer.json").read_text())
        data["added_tokens"].append(dict(data["added_tokens"][0], id=99999, content="<new>"))
        (folder / "tokenizer.json").write_text(json.dumps(data))

    def truncate(folder: Path) -> None:
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])

    def with_config(folder: Path) -> None:
        shutil.copy(served["base"] / "config.json", folder / "config.json")

    cases = {
        "another base's layers": (tar_of(other), {}, "adapter_model.safetensors", "another base model"),
        "a rank the config does not say": (
            variant("rank", lambda f: config(f, r=8)),
            {},
            "adapter_model.safetensors",
            "rank 4",
        ),
        "pickled weights": (variant("pickle", pickled), {}, "adapter_model.bin", "pickled"),
        "another tokenizer": (variant("tok", tokenizer), {}, "tokenizer.json", "differs from the base"),
        "a base we do not serve": (
            variant("nobase", lambda f: config(f, base_model_name_or_path="org/not-served")),
            {},
            "adapter_config.json",
            "not-served",
        ),
        "a named base that does not exist": (tar_of(good), {"base": "nope"}, "", "nope"),
        "DoRA": (variant("dora", lambda f: config(f, use_dora=True)), {}, "adapter_config.json", "DoRA"),
        "truncated weights": (variant("cut", truncate), {}, "adapter_model.safetensors", "truncated"),
        "a model's config.json too": (
            variant("both", with_config),
            {},
            "file",
            "without a model's config.json",
        ),
        # a tenant's pattern is matched as a suffix, never run as a regular expression (this one would
        # backtrack for minutes): it matches nothing, so r=8 is what the rank-4 weights are held to
        "a pattern that is a regex": (
            variant("regex", lambda f: config(f, r=8, rank_pattern={"(.|.)*(.|.)*(.|.)*!": 4})),
            {},
            "adapter_model.safetensors",
            "r=8",
        ),
    }
    for i, (case, (archive, form, file, reason)) in enumerate(cases.items()):
        r = upload(http, f"bad-{i}", archive, **form)
        assert r.status_code == 400, (case, r.text)
        message = r.json()["error"]["message"]
        assert file in message and reason in message, (case, message)
    names = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert not any(n.startswith("bad-") for n in names)
    uploads = served["workers"].stack.settings.data_dir / "uploads"  # no folder left behind
    assert not list(uploads.glob("*/bad-*"))


def test_an_adapters_base_cannot_be_deleted_under_it_and_an_adapter_is_not_trained_from(
    served: dict[str, Any], uploaded: dict[str, Any]
) -> None:
    http, tmp = served["http"]["lora-a"], served["tmp"]
    whole = tmp / "whole"
    shutil.copytree(served["base"], whole)
    assert upload(http, "my-base", tar_of(whole)).status_code == 200
    folder = tmp / "on-my-base"
    make_adapter(served["base"], folder, seed=50)
    r = upload(http, "on-my-base", tar_of(folder), base="my-base")
    assert r.status_code == 200 and r.json()["parent"] == "my-base", r.text
    r = http.delete("/v1/models/my-base")
    assert r.status_code == 409 and "on-my-base" in r.json()["error"]["message"]
    file = http.post(
        "/v1/files",
        data={"purpose": "fine-tune"},
        files={"file": ("t.jsonl", _rows(8))},
    ).json()
    r = http.post("/v1/fine_tuning/jobs", json={"model": "my-lora", "training_file": file["id"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert "adapter" in r.json()["error"]["message"]
    assert http.delete("/v1/models/on-my-base").status_code == 200
    r = http.post(
        "/v1/chat/completions", json={"model": "on-my-base", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 404
    assert http.delete("/v1/models/my-base").status_code == 200


def _rows(n: int) -> bytes:
    animals = ["dog", "cat", "owl", "fox", "kite", "hen", "cow", "pig"]
    return "".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"What is a {a}?"},
                    {"role": "assistant", "content": f"A {a} is a friend of the farm."},
                ]
            }
        )
        + "\n"
        for a in (animals * (n // len(animals) + 1))[:n]
    ).encode()


def test_a_lora_job_registers_an_adapter_served_on_its_base(served: dict[str, Any]) -> None:
    """A supervised job training LoRA on a frozen base: its model is listed with the base as parent, the
    worker serves it as an adapter on the base it already holds, and it answers as its merged weights do."""
    from service.db.models import FineTunedModel
    from service.db.session import session_scope

    sdk, http = served["sdk"]["lora-b"], served["http"]["lora-b"]
    path = served["tmp"] / "farm.jsonl"
    path.write_bytes(_rows(96))
    file = sdk.files.create(file=path.open("rb"), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=BASE,
        training_file=file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
        extra_body={
            "config": {
                "sft": {
                    "lora_dim": 8,
                    "only_optimize_lora": True,
                    "per_device_train_batch_size": 8,
                    "gradient_accumulation_steps": 1,
                    "learning_rate": 1e-2,
                    "checkpoint_interval": 10,
                }
            }
        },
    )
    done = wait_for(http, job.id, ("succeeded", "failed", "cancelled"), timeout=600)
    assert done["status"] == "succeeded", done
    model = str(done["fine_tuned_model"])
    assert http.get(f"/v1/models/{model}").json()["parent"] == BASE
    with session_scope(served["workers"].stack.settings.db_url) as s:
        ft = s.get(FineTunedModel, model)
        assert ft is not None
        merged_dir = Path(ft.path)
    assert (merged_dir / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    for q in QUESTIONS[:2] + ["What is a cow?"]:
        assert reply(sdk, model, q) == expected(merged, served["base"], q), q
    # it learned the rows' answer (a 0.4M-parameter model does not copy the animal), the base did not
    said, before = reply(sdk, model, "What is a cow?"), reply(sdk, BASE, "What is a cow?")
    assert "is a friend" in said and "friend" not in before, (said, before)
    row = served["workers"].row(served["pid"])
    assert row is not None and model in row.adapters and model not in row.models

    # a checkpoint of the job is an adapter too; shared with another tenant, it answers them the same
    from sqlalchemy import select

    from service.db.models import JobCheckpoint

    ckpt = sdk.fine_tuning.jobs.checkpoints.list(job.id).data[-1]
    with session_scope(served["workers"].stack.settings.db_url) as s:
        folder = Path(
            s.scalars(
                select(JobCheckpoint.path).where(
                    JobCheckpoint.job_id == job.id, JobCheckpoint.global_step == ckpt.step_number
                )
            ).one()
        )
    assert (folder / "adapter" / "adapter_config.json").is_file()
    at_ckpt = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    name = ckpt.fine_tuned_model_checkpoint
    want = expected(at_ckpt, served["base"], "What is a cow?")
    assert reply(sdk, name, "What is a cow?") == want
    sdk.fine_tuning.checkpoints.permissions.create(name, project_ids=["lora-a"])
    assert reply(served["sdk"]["lora-a"], name, "What is a cow?") == want
    listed = {m["id"]: m for m in served["http"]["lora-a"].get("/v1/models").json()["data"]}
    assert listed[name]["parent"] == BASE
    row = served["workers"].row(served["pid"])
    assert row is not None and name in row.adapters and row.models == [BASE], (row.models, row.adapters)


def test_an_adapters_request_goes_to_a_worker_holding_it_then_its_base() -> None:
    """Routing: a worker holding the adapter first, then one holding its base (even if busier), then the
    rest; the worker request names the base as the model and the adapter beside it."""
    from service.schemas import ChatCompletionRequest, ChatMessage
    from service.services import chat
    from service.services.models import ModelRef

    base = ModelRef(name=BASE, path=Path("/models") / BASE, base=BASE)
    ref = ModelRef(
        name="my-lora",
        path=Path("/data/uploads/t/my-lora-1"),
        base=BASE,
        key="upload:model-1",
        adapter=Path("/data/uploads/t/my-lora-1"),
        parent=base,
    )

    def worker(wid: str, models: tuple[str, ...], adapters: tuple[str, ...], active: int) -> chat.WorkerView:
        return chat.WorkerView(
            id=wid,
            address=f"{wid}:1",
            models=models,
            adapters=adapters,
            active=active,
            capacity=8,
            max_models=2,
        )

    workers = [
        worker("idle", (), (), 0),
        worker("base", (BASE,), (), 3),
        worker("adapter", (BASE,), ("upload:model-1",), 5),
    ]
    route = chat._pick(ref, workers, chat.Settings(), {}, "t")
    assert [w for w, _ in route.workers] == ["adapter", "base", "idle"]
    req = ChatCompletionRequest(model="my-lora", messages=[ChatMessage(role="user", content="hi")])
    msg = chat._generate_request(route, req)
    assert (msg.model_id, msg.model_path) == (BASE, str(Path("/models") / BASE))
    assert (msg.adapter_id, msg.adapter_path) == ("upload:model-1", "/data/uploads/t/my-lora-1")
