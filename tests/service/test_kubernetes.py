"""The `kubernetes` launch backend: a step as a Kubeflow Trainer TrainJob through the official client.

No cluster can run on this machine (no container runtime, no kubelet): the client's calls go to a
loopback API server (tests/helpers/kube_api.py) that checks each TrainJob against Trainer's CRD schema
and answers with the API server's shapes (Status objects, 201/404/409/422). For the service test it
also plays Trainer's controller on one node: the TrainJob's trainer command runs here with the
TrainJob's environment, so the command and environment the backend generates are the ones that train.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from service.db.models import Job, JobMetric
from service.db.session import session_scope
from service.settings import Settings
from tests.helpers.kube_api import KubeAPI
from tests.service.conftest import Stack, wait_for
from workers import kube, launchers

TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/rlhf/trainjobs"


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    server = KubeAPI()
    yield server
    server.close()


def _settings(tmp: Path, api: KubeAPI, **over: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp,
        "launch_backend": "kubernetes",
        "kube_image": "registry.example/rlhf-worker:1.4.0",
        "kube_api_url": api.url,
        "kube_poll_s": 0.05,
        "max_nodes_per_job": 4,
    }
    return Settings(**(values | over))  # type: ignore[arg-type]


def _spec(tmp: Path, attempt: int = 1, **over: object) -> launchers.StepSpec:
    values: dict[str, object] = {
        "job_id": "ftjob-7f3a",
        "step": 3,
        "attempt": attempt,
        "argv": [
            "/opt/venv/bin/python",
            "-m",
            "rlhf_engine.cli",
            "ppo",
            "--config",
            "/data/runs/t/c/step3.yaml",
        ],
        "env": {
            "RLHF_ATTEMPT": str(attempt),
            "DS_ACCELERATOR": "cuda",
            "HF_HUB_OFFLINE": "1",
            "DATABASE_URL": "postgresql://rlhf:secret@db/rlhf",
            "RLHF_INFERENCE_TOKEN": "do-not-leak",
            "RLHF_DATABASE_URL": "postgresql://rlhf:secret@db/rlhf",
            "HF_TOKEN": "hf_do-not-leak",
            "RLHF_JUDGE_TOKEN": "job-scoped",
            "PATH": "/usr/bin",
        },
        "log": tmp / "logs" / "step3_rlhf.log",
        "step_dir": tmp / "step3_rlhf",
        "nodes": 2,
        "per_node": 4,
        "gpus": True,
        "estimate_s": 3600.0,
    }
    values |= over
    (tmp / "step3_rlhf").mkdir(parents=True, exist_ok=True)
    return launchers.StepSpec(**values)  # type: ignore[arg-type]


def test_a_trainjob_is_created_followed_and_deleted(api: KubeAPI, tmp_path: Path) -> None:
    settings = _settings(tmp_path, api)
    run = kube.KubeRun(_spec(tmp_path), settings)
    assert run.name.startswith("rlhf-ftjob-7f3a-s3-a1-") and len(run.name) <= 63
    obj = api.objects[("rlhf", run.name)]
    trainer = obj["spec"]["trainer"]
    assert obj["spec"]["runtimeRef"] == {
        "name": "rlhf-deepspeed",
        "kind": "ClusterTrainingRuntime",
        "apiGroup": "trainer.kubeflow.org",
    }
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    assert "--launcher mpirun --hostfile /etc/mpi/hostfile" in trainer["command"][2]
    assert "--num-gpus 4 --nodes 2" in trainer["command"][2] and trainer["command"][2].startswith("exec ")
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["RLHF_ATTEMPT"] == "1" and env["DS_ACCELERATOR"] == "cuda"
    assert env["RLHF_JUDGE_TOKEN"] == "job-scoped"  # the step's own, for its judges
    for secret in ("DATABASE_URL", "RLHF_DATABASE_URL", "RLHF_INFERENCE_TOKEN", "HF_TOKEN", "REDIS_URL"):
        assert secret not in env  # the worker's secrets stay with the worker
    assert obj["spec"]["activeDeadlineSeconds"] == 3 * 3600  # 3 × the estimate
    pod = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    mounts = pod["template"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mounts == [{"name": "rlhf-data", "mountPath": str(tmp_path)}]

    # pods pending (the child Job active, nothing ready): not running yet, so not billed
    api.set_status(run.name, active=1, ready=0)
    time.sleep(0.1)
    assert run.poll() is None and "pods pending" in run.waiting() and not run.running()
    api.set_status(run.name, active=1, ready=1)
    time.sleep(0.1)
    assert run.running() and run.poll() is None and run.waiting() == ""

    # the next launch of the step (a restart, a new attempt) deletes the one before it, then creates its own
    api.requests.clear()
    second = kube.KubeRun(_spec(tmp_path, attempt=2), settings)
    methods = [(m, p.rsplit("/", 1)[-1]) for m, p in api.requests]
    assert methods.index(("DELETE", run.name)) < methods.index(("POST", "trainjobs"))
    assert set(api.objects) == {("rlhf", second.name)}
    api.set_status(second.name, active=1, ready=1, condition="Complete", reason="JobsCompleted")
    time.sleep(0.1)
    assert second.poll() == launchers.Ended(0)
    assert api.objects == {}  # a finished TrainJob is deleted: its pods go, its records stay on the claim

    third = kube.KubeRun(_spec(tmp_path, attempt=3), settings)
    third.stop(0)  # cancel: the TrainJob is deleted, its pods terminated
    assert api.objects == {}
    ended = third.poll()
    assert ended is not None and "was deleted" in ended.killed_by


def test_the_time_limit_and_evictions_are_the_clusters_doing(api: KubeAPI, tmp_path: Path) -> None:
    """Retried (the worker's killed outcome), not the step's failure; a restart under the same attempt gets
    a name of its own (no 409 from the TrainJob that just ended)."""
    run = kube.KubeRun(_spec(tmp_path), _settings(tmp_path, api))
    api.set_status(run.name, condition="Failed", reason="DeadlineExceeded", message="activeDeadlineSeconds")
    time.sleep(0.1)
    ended = run.poll()
    assert ended is not None and ended.code < 0 and "time limit" in ended.killed_by
    again = kube.KubeRun(_spec(tmp_path), _settings(tmp_path, api))
    assert again.name != run.name and ("rlhf", again.name) in api.objects
    api.set_status(
        again.name, condition="Failed", reason="TrainJobFailed", message="jobset failed: pod evicted"
    )
    time.sleep(0.1)
    evicted = again.poll()
    assert evicted is not None and "ended by the cluster" in evicted.killed_by
    last = kube.KubeRun(_spec(tmp_path), _settings(tmp_path, api))
    api.set_status(last.name, condition="Failed", reason="TrainJobFailed", message="trainer exited 1")
    time.sleep(0.1)
    failed = last.poll()
    assert failed is not None and failed.code == 1 and failed.killed_by == ""  # the step's own failure


def test_a_refused_trainjob_fails_with_the_api_servers_words(api: KubeAPI, tmp_path: Path) -> None:
    """An empty runtime name breaks the CRD's minLength: 422 Invalid, its message naming the field."""
    with pytest.raises(launchers.LaunchError) as e:
        kube.KubeRun(_spec(tmp_path), _settings(tmp_path, api, kube_runtime=""))
    assert "(422)" in str(e.value) and "spec.runtimeRef.name" in str(e.value)
    assert api.objects == {}
    unreachable = _settings(tmp_path, api, kube_api_url="http://127.0.0.1:9")
    with pytest.raises(launchers.LaunchError, match="could not reach the Kubernetes API"):
        kube.KubeRun(_spec(tmp_path), unreachable)


# ---------------------------------------------------------------------------- through the service


@pytest.fixture(scope="module")
def controller() -> Iterator[KubeAPI]:
    server = KubeAPI(controller=True)
    yield server
    server.close()


@pytest.fixture(scope="module")
def kube_stack(
    controller: KubeAPI,
    make_stack: Callable[..., Stack],
    new_pg: Callable[[], str],
    new_redis: Callable[[], str],
) -> Stack:
    return make_stack(
        database_url=new_pg(),
        redis_url=new_redis(),
        launch_backend="kubernetes",
        kube_api_url=controller.url,
        kube_image="rlhf-worker:test",
        kube_poll_s=0.5,
    )


@pytest.mark.timeout(600)
def test_jobs_run_and_cancel_as_trainjobs(
    kube_stack: Stack, controller: KubeAPI, case_workers: Callable[..., object]
) -> None:
    case_workers(kube_stack)
    sft = {
        "model": "tiny-opt-xs",
        "preset": "tiny",
        "config": {"sft": {"max_steps": 20, "eval_max_rows": 16}},
    }
    with kube_stack.client(kube_stack.key("kube")) as c:
        job = c.post("/v1/fine_tuning/jobs", json=sft).json()
        done = wait_for(c, job["id"], ("succeeded", "failed", "cancelled"), timeout=300)
        assert done["status"] == "succeeded", done
        out = _output_dir(kube_stack, job["id"])
        name = json.loads((out / "step1_sft" / "trainjob.json").read_text())["name"]
        assert name.startswith(f"rlhf-{job['id']}-s1-a1-")
        assert controller.procs[("rlhf", name)].returncode == 0  # the "pod" ran the step to its end
        assert ("DELETE", f"{TRAINJOBS}/{name}") in controller.requests  # finished: deleted
        with session_scope(kube_stack.settings.db_url) as s:
            steps = s.scalars(select(JobMetric.global_step).where(JobMetric.job_id == job["id"])).all()
        assert sorted(steps)[-1] == 20  # read from the shared run directory the "pod" wrote
        assert '"global_steps": 20' in (out / "logs" / "step1_sft.log").read_text()  # the step's own output

        long = sft | {"config": {"sft": {"max_steps": 2000, "eval_max_rows": 16}}}
        job = c.post("/v1/fine_tuning/jobs", json=long).json()
        deadline = time.monotonic() + 240
        while not c.get(f"/v1/fine_tuning/jobs/{job['id']}/metrics", params={"limit": 1}).json()["data"]:
            assert time.monotonic() < deadline, "the TrainJob's step did not start training"
            time.sleep(0.5)
        out = _output_dir(kube_stack, job["id"])
        name = json.loads((out / "step1_sft" / "trainjob.json").read_text())["name"]
        assert c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
        wait_for(c, job["id"], ("cancelled",), timeout=60)
        deadline = time.monotonic() + 120
        while ("rlhf", name) in controller.objects or controller.procs[("rlhf", name)].poll() is None:
            assert time.monotonic() < deadline, "the cancelled job's TrainJob or its process is still there"
            time.sleep(0.5)


def _output_dir(stack: Stack, job_id: str) -> Path:
    with session_scope(stack.settings.db_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return Path(job.output_dir)
