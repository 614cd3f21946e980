"""The Kubernetes manifests (docker/kubernetes/) and the TrainJobs the `kubernetes` backend generates,
validated offline: no cluster can run here. Kubernetes' own JSON schemas (kubernetes-validate, strict: a
misspelt or unknown field fails) for the service's manifests; Kubeflow Trainer's TrainJob CRD (vendored,
docker/kubernetes/crds/) for TrainJobs. The images' Dockerfiles and compose file are checked by `make lint`
(hadolint, `docker compose config`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import Settings
from tests.helpers.kube_api import schema_errors
from workers import kube, launchers

ROOT = Path(__file__).resolve().parents[1]
KDIR = ROOT / "docker" / "kubernetes"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes the manifests target (gRPC probes, sidecar-free)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


MANIFESTS = sorted(
    p for p in KDIR.rglob("*.yaml") if "crds" not in p.parts and p.name != "kustomization.yaml"
)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(KDIR)))
def test_every_manifest_matches_kubernetes_schemas(path: Path) -> None:
    for doc in _docs(path):
        if doc["apiVersion"].startswith("trainer.kubeflow.org/"):  # Trainer's own kinds: its CRDs
            assert schema_errors(doc) == [], (path.name, schema_errors(doc))
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}"
            )


def test_the_kustomization_lists_what_exists_and_every_pod_is_hardened() -> None:
    kust = yaml.safe_load((KDIR / "kustomization.yaml").read_text())
    assert all((KDIR / r).is_file() for r in kust["resources"])
    assert "secret.example.yaml" not in kust["resources"]  # never applied: real secrets are made by hand
    images = {i["name"] for i in kust["images"]}
    for path in MANIFESTS:
        for doc in _docs(path):
            if doc["kind"] == "ClusterTrainingRuntime":  # every pod of a TrainJob: our user, not root
                for job in doc["spec"]["template"]["spec"]["replicatedJobs"]:
                    pod = job["template"]["spec"]["template"]["spec"]
                    assert (
                        pod["securityContext"]["runAsUser"] == 10001
                        and pod["securityContext"]["runAsNonRoot"]
                    )
                continue
            if doc["kind"] not in ("Deployment", "StatefulSet"):
                continue
            pod = doc["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
            for c in pod["containers"]:
                probes = {"readinessProbe", "livenessProbe"} & set(c)
                assert probes, f"{doc['metadata']['name']}/{c['name']} has no probe"
                if path.parent == KDIR:  # ours: images pinned by the kustomization, no privilege escalation
                    assert c["image"] in images and c["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_config_and_secret_make_valid_production_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a pod's environment holds (ConfigMap + Secret) is a settings object the service accepts."""
    config = _docs(KDIR / "config.yaml")[0]["data"]
    secret = _docs(KDIR / "secret.example.yaml")[0]["stringData"]
    for k in list(os.environ):
        if k.startswith("RLHF_") or k in ("DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(k)
    for k, v in (config | secret).items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.launch_backend == "kubernetes" and s.environment == "production"
    assert s.kube_image and s.kube_data_claim == _docs(KDIR / "storage.yaml")[0]["metadata"]["name"]
    assert s.kube_runtime == _docs(KDIR / "trainjob-runtime.yaml")[0]["metadata"]["name"]
    rbac = {d["metadata"]["name"] for d in _docs(KDIR / "rbac.yaml") if d["kind"] == "ServiceAccount"}
    assert s.kube_service_account in rbac


@pytest.mark.parametrize(
    "nodes,per_node,gpus", [(1, 1, False), (2, 1, False), (8, 8, True)], ids=["1x1-cpu", "2x1-cpu", "8x8-gpu"]
)
def test_generated_trainjobs_match_the_trainjob_crd(
    nodes: int, per_node: int, gpus: bool, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        launch_backend="kubernetes",
        kube_image="registry.example/rlhf-worker:1.0.0",
        kube_service_account="rlhf-trainjob",
        max_nodes_per_job=8,
    )
    spec = launchers.StepSpec(
        job_id="ftjob-0123456789abcdef01234567",
        step=2,
        attempt=12,
        argv=[
            "/opt/venv/bin/python",
            "-m",
            "rlhf_engine.cli",
            "reward",
            "--config",
            "/data/runs/t/c/step2.yaml",
        ],
        env={"RLHF_ATTEMPT": "12", "DS_ACCELERATOR": "cuda" if gpus else "cpu"},
        log=tmp_path / "step2.log",
        step_dir=tmp_path / "step2_reward",
        nodes=nodes,
        per_node=per_node,
        gpus=gpus,
        estimate_s=None,
    )
    manifest = kube.train_job_manifest(spec, settings)
    assert schema_errors(manifest) == []
    assert len(manifest["metadata"]["name"]) <= 63
    # and a broken one is caught by the same check (it would be by the API server)
    broken = manifest | {
        "spec": manifest["spec"] | {"trainer": manifest["spec"]["trainer"] | {"numNodes": "8"}}
    }
    assert any(e.startswith("spec.trainer.numNodes") for e in schema_errors(broken))
