"""A Kubernetes API server for TrainJobs on loopback, for the tests: no cluster can run on this machine
(no container runtime, no kubelet), so the `kubernetes` launch backend's client calls are tested against
this server, which answers with the API server's own request and response shapes:

- `POST /apis/trainer.kubeflow.org/v1alpha1/namespaces/NS/trainjobs` validates the body against Kubeflow
  Trainer's CRD schema (docker/kubernetes/crds/, vendored) and metadata.name as a DNS-1123 subdomain;
  a bad one is `422 Invalid` with a `Status` naming the field, a taken name `409 AlreadyExists`; a good
  one `201` with uid, resourceVersion, creationTimestamp, generation set.
- `GET …/trainjobs/NAME` (`404 NotFound` Status), `GET …/trainjobs?labelSelector=a=b,c=d` (a TrainJobList),
  `DELETE …/trainjobs/NAME` (`200` Status Success).

`controller=True` also plays Kubeflow Trainer's part on one node: each new TrainJob's trainer command
runs here as a process with the TrainJob's environment, its status goes active, then `Complete` or
`Failed` by the exit code; deleting the TrainJob SIGTERMs the process (the pod's termination), then
SIGKILLs it after terminationGracePeriodSeconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
PATH = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


CRDS = ROOT / "docker" / "kubernetes" / "crds"


def crd_schema(kind: str) -> dict[str, Any]:
    """The v1alpha1 openAPIV3Schema of a vendored Trainer CRD ("TrainJob", "ClusterTrainingRuntime")."""
    for path in sorted(CRDS.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        if docs and docs[0]["spec"]["names"]["kind"] == kind:
            versions = docs[0]["spec"]["versions"]
            schema: dict[str, Any] = next(v for v in versions if v["name"] == "v1alpha1")["schema"][
                "openAPIV3Schema"
            ]
            return schema
    raise KeyError(f"no vendored CRD for {kind} in {CRDS}")


def trainjob_schema() -> dict[str, Any]:
    return crd_schema("TrainJob")


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """What the API server's structural-schema validation would refuse, as `path: message` lines."""
    validator = jsonschema.Draft7Validator(crd_schema(obj.get("kind") or "TrainJob"))
    out = []
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(p) for p in e.absolute_path) or "<root>"
        out.append(f"{path}: {e.message}")
    name = (obj.get("metadata") or {}).get("name", "")
    if not name or len(name) > 253 or not DNS1123.match(name):
        out.append(
            f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of …"
        )
    return out


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


class KubeAPI:
    def __init__(self, *, controller: bool = False) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in order
        self.procs: dict[tuple[str, str], subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()
        self.version = 1000
        self.controller = controller
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict[str, Any]:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                api.requests.append((method, url.path))
                m = PATH.match(url.path)
                if not m:
                    self._send(
                        404,
                        status(
                            404, "NotFound", f"the server could not find the requested resource ({url.path})"
                        ),
                    )
                    return
                code, body = api.handle(method, m.group(1), m.group(2), parse_qs(url.query), self)
                self._send(code, body)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # -------------------------------------------------------------------- the API

    def handle(
        self, method: str, ns: str, name: str | None, query: dict[str, list[str]], req: Any
    ) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.version += 1
            if method == "POST" and name is None:
                obj = req._body()
                obj_name = (obj.get("metadata") or {}).get("name", "")
                errors = schema_errors(obj)
                if errors:
                    causes = [
                        {"reason": "FieldValueInvalid", "message": e, "field": e.split(":")[0]}
                        for e in errors
                    ]
                    return 422, status(
                        422,
                        "Invalid",
                        f'TrainJob.trainer.kubeflow.org "{obj_name}" is invalid: {"; ".join(errors)}',
                        {
                            "name": obj_name,
                            "group": "trainer.kubeflow.org",
                            "kind": "TrainJob",
                            "causes": causes,
                        },
                    )
                if (ns, obj_name) in self.objects:
                    return 409, status(
                        409,
                        "AlreadyExists",
                        f'trainjobs.trainer.kubeflow.org "{obj_name}" already exists',
                        {"name": obj_name, "group": "trainer.kubeflow.org", "kind": "trainjobs"},
                    )
                obj["metadata"] |= {
                    "namespace": ns,
                    "uid": str(uuid.uuid4()),
                    "resourceVersion": str(self.version),
                    "generation": 1,
                    "creationTimestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                obj["status"] = {"conditions": [], "jobsStatus": []}
                self.objects[(ns, obj_name)] = obj
                if self.controller:
                    self._run(ns, obj_name, obj)
                return 201, obj
            if method == "GET" and name is None:
                wanted = dict(
                    kv.split("=", 1) for kv in (query.get("labelSelector") or [""])[0].split(",") if "=" in kv
                )
                items = [
                    o
                    for (n, _), o in self.objects.items()
                    if n == ns and all(o["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
                ]
                return 200, {
                    "apiVersion": "trainer.kubeflow.org/v1alpha1",
                    "kind": "TrainJobList",
                    "metadata": {"resourceVersion": str(self.version)},
                    "items": items,
                }
            assert name is not None
            obj = self.objects.get((ns, name))
            if obj is None:
                return 404, status(
                    404,
                    "NotFound",
                    f'trainjobs.trainer.kubeflow.org "{name}" not found',
                    {"name": name, "group": "trainer.kubeflow.org", "kind": "trainjobs"},
                )
            if method == "GET":
                return 200, obj
            # DELETE: the pods are terminated (SIGTERM, then SIGKILL after the grace), then the object goes
            del self.objects[(ns, name)]
            self._terminate(ns, name, obj)
            return 200, {
                **status(200, "", ""),
                "status": "Success",
                "details": {
                    "name": name,
                    "group": "trainer.kubeflow.org",
                    "kind": "trainjobs",
                    "uid": obj["metadata"]["uid"],
                },
            }

    # -------------------------------------------------------------------- the controller's part

    def set_status(
        self,
        name: str,
        ns: str = "rlhf",
        *,
        active: int = 0,
        ready: int | None = None,
        condition: str | None = None,
        reason: str = "",
        message: str = "",
    ) -> None:
        """Trainer's controller's report: child Jobs active (pods running or pending), ready; a condition."""
        with self.lock:
            obj = self.objects[(ns, name)]
            obj["status"]["jobsStatus"] = [
                {
                    "name": "launcher",
                    "active": active,
                    "ready": active if ready is None else ready,
                    "succeeded": 0,
                    "failed": 0,
                    "suspended": 0,
                }
            ]
            if condition:
                obj["status"]["conditions"].append(
                    {
                        "type": condition,
                        "status": "True",
                        "reason": reason or condition,
                        "message": message,
                        "lastTransitionTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                )

    def _run(self, ns: str, name: str, obj: dict[str, Any]) -> None:
        trainer = obj["spec"]["trainer"]
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
        env |= {e["name"]: e["value"] for e in trainer.get("env", [])}
        proc = subprocess.Popen(trainer["command"], env=env, start_new_session=True, cwd=ROOT)
        self.procs[(ns, name)] = proc
        obj["status"]["jobsStatus"] = [
            {"name": "launcher", "active": 1, "ready": 1, "succeeded": 0, "failed": 0}
        ]

        def wait() -> None:
            code = proc.wait()  # bounded: the step ends, or deletion ends it
            with self.lock:
                if (ns, name) not in self.objects:
                    return
            self.set_status(
                name,
                ns,
                active=0,
                condition="Complete" if code == 0 else "Failed",
                reason="JobsCompleted" if code == 0 else "TrainJobFailed",
                message=f"trainer exited {code}",
            )

        threading.Thread(target=wait, daemon=True).start()

    def _terminate(self, ns: str, name: str, obj: dict[str, Any]) -> None:
        proc = self.procs.get((ns, name))
        if proc is None or proc.poll() is not None:
            return
        grace = 30
        for patch in obj["spec"].get("runtimePatches", []):
            for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                grace = job["template"]["spec"]["template"]["spec"].get(
                    "terminationGracePeriodSeconds", grace
                )
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

        def kill_after() -> None:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)

        threading.Thread(target=kill_after, daemon=True).start()

    def processes(self) -> Iterator[subprocess.Popen[bytes]]:
        yield from self.procs.values()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self.server.shutdown()
        self.server.server_close()
        deadline = time.monotonic() + 5
        while self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
