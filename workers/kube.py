"""The `kubernetes` launch backend: each step of a job as one Kubeflow Trainer `TrainJob`
(`trainer.kubeflow.org/v1alpha1`, Trainer v2) on a DeepSpeed ClusterTrainingRuntime — ours,
`rlhf-deepspeed` (docker/kubernetes/trainjob-runtime.yaml: Trainer's `deepspeed-distributed` with our
image and its user) — created, followed and deleted through the official Kubernetes Python client.

    TrainJob rlhf-<job>-s<step>-a<attempt>
      runtimeRef  rlhf-deepspeed (OpenMPI: a launcher pod, node pods running sshd, a hostfile at
                  /etc/mpi/hostfile)
      trainer     image, numNodes, numProcPerNode, GPUs per node, the step's command and environment
      patches     the run directory's PersistentVolumeClaim mounted at RLHF_DATA_DIR in every pod; the
                  grace a step gets to checkpoint on deletion

The launcher pod runs the step's top process (it holds the step folder) with `--launcher mpirun
--hostfile /etc/mpi/hostfile`: one rank per GPU on every node, torch.distributed's variables from
OpenMPI's. Progress comes from the shared run directory, as for every backend (workers/launchers.py);
the step's output goes to RUN/logs/ there too, since a pod's log ends with the pod.

Why Trainer v2's TrainJob: it is the Kubeflow training API now (v1's PyTorchJob/MPIJob operators are
the legacy training-operator), and its DeepSpeed runtime is the MPI launch DeepSpeed documents.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shlex
import time
from typing import Any

from rlhf_engine.runtime.launch import NODE_ENV_PREFIXES, without_secrets
from service.settings import Settings
from workers.step_runs import Ended, LaunchError, StepSpec, SupersededLaunchError, limit_minutes

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
MPI_HOSTFILE = "/etc/mpi/hostfile"  # written by Trainer's MPI plugin into the launcher pod
REPLICATED_JOBS = ("launcher", "node")  # the DeepSpeed runtime's, each with a container "node"
CONTAINER = "node"
MANAGER = "rlhf-service"  # who owns this TrainJob's runtime patch
# what a step needs of the worker's environment (the rest — database URL, tokens — never reaches a pod)
STEP_ENV_PREFIXES = (*NODE_ENV_PREFIXES, "PYTHONUNBUFFERED")


def name_of(spec: StepSpec, launch: str = "") -> str:
    """A DNS-1123 name (≤ 63 characters): one TrainJob per launch of a step (an attempt restarts a killed
    step under the same attempt number, so each launch adds its own suffix)."""
    job = re.sub(r"[^a-z0-9-]", "-", spec.job_id.lower()).strip("-")
    tail = f"-s{spec.step}-a{spec.attempt}" + (f"-{launch}" if launch else "")
    return f"rlhf-{job}"[: 63 - len(tail)].rstrip("-") + tail


def labels_of(spec: StepSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGER,
        "rlhf.service/job": re.sub(r"[^A-Za-z0-9_.-]", "-", spec.job_id)[:63],
        "rlhf.service/step": str(spec.step),
        "rlhf.service/attempt": str(spec.attempt),
    }


def step_env(spec: StepSpec) -> list[dict[str, str]]:
    """The step's own variables (its attempt, paths, offline flags, its judge route): never the worker's
    secrets (database, broker, API tokens), which would sit in the TrainJob's spec for anyone who reads it."""
    keep = {k: v for k, v in without_secrets(spec.env).items() if k.startswith(STEP_ENV_PREFIXES)}
    return [{"name": k, "value": v} for k, v in sorted(keep.items())]


def train_job_manifest(spec: StepSpec, settings: Settings, launch: str = "") -> dict[str, Any]:
    """The TrainJob of one attempt of one step (checked against Trainer's CRD: tests/test_manifests.py)."""
    launched = spec.nodes * spec.per_node > 1
    argv = list(spec.argv)
    if launched:
        argv += [
            "--num-gpus",
            str(spec.per_node),
            "--nodes",
            str(spec.nodes),
            "--launcher",
            "mpirun",
            "--hostfile",
            MPI_HOSTFILE,
        ]
    quoted = " ".join(shlex.quote(a) for a in argv)
    # exec: the step becomes the container's process, so deletion's SIGTERM reaches it (it checkpoints)
    command = ["bash", "-c", f"exec {quoted} >>{shlex.quote(str(spec.log))} 2>&1"]
    trainer: dict[str, Any] = {
        "image": settings.kube_image,
        "command": command,
        "numNodes": spec.nodes,
        "numProcPerNode": spec.per_node,
        "env": step_env(spec),
    }
    if spec.gpus:
        trainer["resourcesPerNode"] = {
            "limits": {settings.kube_gpu_resource: str(spec.per_node)},
            "requests": {settings.kube_gpu_resource: str(spec.per_node)},
        }
    pod: dict[str, Any] = {
        "volumes": [{"name": "rlhf-data", "persistentVolumeClaim": {"claimName": settings.kube_data_claim}}],
        "containers": [
            {"name": CONTAINER, "volumeMounts": [{"name": "rlhf-data", "mountPath": str(settings.data_dir)}]}
        ],
        "terminationGracePeriodSeconds": int(settings.step_grace_s) + 30,
    }
    if settings.kube_service_account:
        pod["serviceAccountName"] = settings.kube_service_account
    minutes = limit_minutes(
        spec.estimate_s, factor=settings.step_time_factor, floor_min=settings.step_min_time_min
    )
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name_of(spec, launch),
            "namespace": settings.kube_namespace,
            "labels": labels_of(spec),
        },
        "spec": {
            "runtimeRef": {
                "name": settings.kube_runtime,
                "kind": "ClusterTrainingRuntime",
                "apiGroup": GROUP,
            },
            "activeDeadlineSeconds": minutes * 60,
            "trainer": trainer,
            "runtimePatches": [
                {
                    "manager": MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {
                            "spec": {
                                "replicatedJobs": [
                                    {"name": job, "template": {"spec": {"template": {"spec": pod}}}}
                                    for job in REPLICATED_JOBS
                                ]
                            }
                        }
                    },
                }
            ],
        },
    }


def custom_objects(settings: Settings) -> Any:
    """The official client's CustomObjectsApi: `kube_api_url` when set, else the pod's service account,
    else ~/.kube/config."""
    from kubernetes import client, config

    if settings.kube_api_url:
        conf = client.Configuration()
        conf.host = settings.kube_api_url
        return client.CustomObjectsApi(client.ApiClient(conf))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def _reason(e: Exception) -> str:
    """The API server's own message (its Status object), else the exception's text."""
    body = getattr(e, "body", None)
    with contextlib.suppress(TypeError, ValueError):
        status = json.loads(body or "")
        return str(status.get("message") or status.get("reason") or body)
    return str(getattr(e, "reason", "") or e)


class KubeRun:
    """One attempt of a step as a TrainJob; its status read every `kube_poll_s`."""

    def __init__(self, spec: StepSpec, settings: Settings) -> None:
        from kubernetes.client.exceptions import ApiException

        from rlhf_engine.runtime.fencing import read_fence

        self.settings, self.ns = settings, settings.kube_namespace
        launch = secrets.token_hex(3)
        self.name = name_of(spec, launch)
        self.label = f"TrainJob {self.ns}/{self.name}"
        self.ended: Ended | None = None
        self.active, self.reason, self.checked = False, "", 0.0
        try:
            self.api = custom_objects(settings)
            self._delete_earlier(spec, wait_s=settings.step_grace_s + 60)
            if (read_fence(spec.step_dir) or 0) > spec.attempt:  # a newer attempt took the folder meanwhile
                raise SupersededLaunchError(f"attempt {spec.attempt} of step {spec.step} was superseded")
            body = train_job_manifest(spec, settings, launch)
            self.api.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)
        except LaunchError:
            raise
        except ApiException as e:
            raise LaunchError(f"the Kubernetes API refused the TrainJob ({e.status}): {_reason(e)}") from e
        except Exception as e:  # unreachable API server, no credentials: the step fails with the reason
            raise LaunchError(f"could not reach the Kubernetes API: {e}") from e
        (spec.step_dir / "trainjob.json").write_text(json.dumps({"name": self.name, "attempt": spec.attempt}))

    def _delete_earlier(self, spec: StepSpec, *, wait_s: float) -> None:
        """Delete the TrainJobs an earlier attempt of this step left (its worker died) and wait for them to
        go: the new attempt never trains beside one."""
        selector = ",".join(
            f"{k}={v}" for k, v in labels_of(spec).items() if k in ("rlhf.service/job", "rlhf.service/step")
        )
        found = self.api.list_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, label_selector=selector
        )
        earlier = [i["metadata"]["name"] for i in found.get("items", [])]  # every earlier launch of the step
        for name in earlier:
            self._delete(name)
        deadline = time.monotonic() + wait_s
        while earlier and time.monotonic() < deadline:
            earlier = [n for n in earlier if self._get(n) is not None]
            time.sleep(1)

    def _get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.api.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
            return obj
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _delete(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                self.ns,
                PLURAL,
                name,
                body=client.V1DeleteOptions(propagation_policy="Foreground"),
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def _refresh(self, force: bool = False) -> None:
        if self.ended is not None or (
            not force and time.monotonic() - self.checked < self.settings.kube_poll_s
        ):
            return
        self.checked = time.monotonic()
        try:
            obj = self._get(self.name)
        except Exception as e:  # the API server is away: keep following, say why
            self.reason = f"the Kubernetes API does not answer: {e}"
            return
        if obj is None:
            self.ended = Ended(-15, f"was deleted ({self.label} is gone)")
            return
        status = obj.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        jobs = status.get("jobsStatus") or []
        # `ready`, not `active`: a child Job is active while its pods are still pending (pulling the image,
        # waiting for GPUs), and that wait is neither billed nor stall-checked
        self.active = any((j.get("ready") or 0) > 0 for j in jobs)
        if "Complete" in conditions:
            self.ended = Ended(0)
        elif "Failed" in conditions:
            c = conditions["Failed"]
            why = f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
            if c.get("reason") == "DeadlineExceeded":
                self.ended = Ended(-15, f"reached its time limit ({why})", resumable=True)
            elif re.search(r"evict|preempt|node|disrupt", why, re.I):  # the cluster's doing: retried
                self.ended = Ended(-15, f"was ended by the cluster ({why})", resumable=True)
            else:
                self.ended = Ended(1, "")
            self.reason = why
        elif "Suspended" in conditions:
            self.reason = "suspended"
        else:
            self.reason = "pods pending" if not self.active else ""
        if self.ended is not None:  # done: its pods go (the step's log and records are on the data claim)
            with contextlib.suppress(Exception):
                self._delete(self.name)

    def poll(self) -> Ended | None:
        self._refresh()
        return self.ended

    def running(self) -> bool:
        self._refresh()
        return self.active or self.ended is not None

    def waiting(self) -> str:
        return "" if self.running() else f"waiting for Kubernetes ({self.reason or 'pods pending'})"

    def stop(self, grace: float) -> None:
        """Delete the TrainJob (its pods get SIGTERM, then terminationGracePeriodSeconds to checkpoint)."""
        if self.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self._delete(self.name)
        deadline = time.monotonic() + max(grace, 0) + 60
        while time.monotonic() < deadline:
            self._refresh(force=True)
            if self.ended is not None:
                return
            time.sleep(1)
