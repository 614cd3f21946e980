"""The `rlhf` command: the service's commands here, everything else from rlhf_engine.cli.

    rlhf serve [--all-in-one] [--host H] [--port P] [--grpc-port G]
                                         the REST + gRPC API server (all-in-one: and both workers)
    rlhf worker train                    a Celery training worker (+ the sweeper)
    rlhf worker inference [--port P]     serves finished models to the API (gRPC, internal)
    rlhf worker evals                    a Celery worker for eval runs (+ their sweeper)
    rlhf keys create --tenant T [--name N] [--operator] | list [--tenant T] | revoke KEY_ID
    rlhf demo [--model tiny|smollm2] [--data-dir D] [--run-link L]
                                         all-in-one server + a 3-step job over HTTP
    rlhf health api [URL] | inference [HOST:PORT] | worker
                                         exit 0 when the part on this host answers (container healthchecks)

This module sits in workers/ because it starts workers; the API server it starts never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

SERVICE_COMMANDS = ("serve", "worker", "keys", "demo", "health")
HEALTH_TIMEOUT_S = 5.0


def _settings() -> Settings:
    from service.settings import get_settings

    return get_settings()


def cmd_keys(ns: argparse.Namespace) -> int:
    from service.db.migrate import migrate
    from service.db.session import session_scope
    from service.services import keys

    settings = _settings()
    migrate(settings.db_url, timeout_s=settings.migrate_timeout_s)
    with session_scope(settings.db_url) as s:
        if ns.keys_command == "create":
            key, plain = keys.create_key(session=s, tenant=ns.tenant, name=ns.name, operator=ns.operator)
            print(plain)
            print(
                f"key {key.id} for tenant {key.tenant_id}{' (operator)' if key.operator else ''}; "
                "shown once, stored only as a hash",
                file=sys.stderr,
            )
        elif ns.keys_command == "list":
            for k in keys.list_keys(session=s, tenant=ns.tenant):
                state = f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "active"
                print(
                    f"{k.id}  {k.tenant_id:<20} {k.prefix}…  {state}"
                    f"{'  operator' if k.operator else ''}  {k.name}"
                )
        else:
            k = keys.revoke_key(session=s, key_id=ns.key_id)
    if ns.keys_command == "revoke":  # committed: now every API process forgets it
        told = keys.announce_revoked(k, settings.redis_url)
        print(
            f"revoked {k.id} ({k.tenant_id}); "
            + (
                "every API process was told at once"
                if told
                else f"API processes stop accepting it within {settings.auth_cache_s:g} s (RLHF_AUTH_CACHE_S)"
            )
        )
    return 0


def cmd_worker(ns: argparse.Namespace) -> int:
    if ns.kind == "inference":
        from workers.inference import run_inference_worker

        return run_inference_worker(_settings(), port=ns.port)
    if ns.kind == "evals":
        from workers.app import run_evals_worker

        run_evals_worker(loglevel=ns.loglevel)
        return 0
    from workers.app import run_training_worker

    run_training_worker(concurrency=1, sweeper=not ns.no_sweeper, loglevel=ns.loglevel)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from service.api.app import create_app
    from workers.local import run_loop

    settings = _settings()
    if ns.host:
        settings.host = ns.host
    if ns.port:
        settings.port = ns.port
    if ns.grpc_port is not None:
        settings.grpc_port = ns.grpc_port
    app = create_app(settings)  # migrates before any worker starts
    children: list[subprocess.Popen[bytes]] = []
    if ns.all_in_one:
        # (the training steps ask model graders' judges through this API)
        env = dict(os.environ, RLHF_DATA_DIR=str(settings.data_dir), RLHF_API_URL=settings.internal_url)
        for kind in ("train", "inference", "evals"):
            children.append(subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", kind], env=env))
        print(
            f"rlhf: all-in-one — API on http://{settings.host}:{settings.port} (console at /ui/), "
            f"gRPC on {settings.host}:{settings.grpc_port}, training worker pid {children[0].pid}, "
            f"inference worker pid {children[1].pid}, evals worker pid {children[2].pid}, "
            f"database {settings.db_url}, broker {settings.redis_url or 'filesystem (no Redis)'}",
            file=sys.stderr,
            flush=True,
        )
    try:
        run_loop(_serve(app, settings, loglevel=ns.loglevel.lower(), grpc=not ns.no_grpc))
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.step_grace_s + 15
        for child in children:
            try:
                child.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


async def _serve(app: Any, settings: Settings, *, loglevel: str, grpc: bool) -> None:
    """uvicorn (REST, SSE) and the gRPC server in one event loop; the first to stop stops both."""
    import uvicorn

    class Server(uvicorn.Server):
        # uvicorn re-raises SIGTERM/SIGINT after serve() returns, which would kill this process before
        # the gRPC server drains and before `rlhf serve --all-in-one` stops its workers; handle them here
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(
        uvicorn.Config(app, host=settings.host, port=settings.port, log_level=loglevel, access_log=False)
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    grpc_server = None
    if grpc:
        from service.grpc.server import start_server

        grpc_server, port = await start_server(settings)
        logging.getLogger("rlhf.serve").info(
            "gRPC API on %s:%d (JobService, ChatService, ModelService, health, reflection)",
            settings.host,
            port,
        )
    try:
        await server.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=5)


def cmd_health(ns: argparse.Namespace) -> int:
    """The part on this host answers: the API's /healthz, an inference worker's gRPC health service, or a
    training/evals worker's Celery ping through the broker. Exit 0, or 1 with the reason on stderr."""
    settings = _settings()
    try:
        if ns.part == "api":
            import httpx

            url = ns.target or f"http://127.0.0.1:{settings.port}/healthz"
            r = httpx.get(url, timeout=HEALTH_TIMEOUT_S)
            if r.status_code != 200:
                raise RuntimeError(f"{url} answered {r.status_code}")
        elif ns.part == "inference":
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            target = ns.target or f"127.0.0.1:{settings.inference_port}"
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_S
                )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise RuntimeError(
                    f"{target} is {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
                )
        else:
            import socket

            from workers.app import app

            host = socket.gethostname()
            replies = app.control.ping(timeout=HEALTH_TIMEOUT_S) or []
            mine = [name for reply in replies for name in reply if name.endswith(f"@{host}")]
            if not mine:
                raise RuntimeError(
                    f"no Celery worker on {host} answered a ping within {HEALTH_TIMEOUT_S:.0f} s"
                )
    except Exception as e:  # the healthcheck's answer is the exit status; the reason goes to its log
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from workers.demo import run_demo

    return run_demo(Path(ns.data_dir), Path(ns.run_link) if ns.run_link else None, model=ns.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="The service's commands (see `rlhf --help` for all)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sv = sub.add_parser("serve", help="run the API server")
    sv.add_argument(
        "--all-in-one",
        action="store_true",
        help="also run a training and an inference worker (SQLite + no Redis work)",
    )
    sv.add_argument("--host", help="bind address (default RLHF_HOST or 127.0.0.1)")
    sv.add_argument("--port", type=int, help="HTTP port (default RLHF_PORT or 8000)")
    sv.add_argument("--grpc-port", type=int, help="gRPC port (default RLHF_GRPC_PORT or 50051)")
    sv.add_argument("--no-grpc", action="store_true", help="serve REST only")
    sv.add_argument("--loglevel", default="INFO")
    sv.set_defaults(func=cmd_serve)
    wk = sub.add_parser("worker", help="run a worker")
    wk.add_argument(
        "kind",
        choices=["train", "inference", "evals"],
        help="train: Celery training worker; inference: serves finished models to the API; evals: runs "
        "eval runs (Celery)",
    )
    wk.add_argument(
        "--port", type=int, help="inference: gRPC port (default RLHF_INFERENCE_PORT, 0 = any free port)"
    )
    wk.add_argument(
        "--no-sweeper", action="store_true", help="do not re-enqueue orphaned jobs from this worker"
    )
    wk.add_argument("--loglevel", default="INFO")
    wk.set_defaults(func=cmd_worker)
    ks = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    kc = ks.add_parser("create", help="create a key (printed once)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--name", default="")
    kc.add_argument("--operator", action="store_true", help="may read /metrics")
    kl = ks.add_parser("list", help="list keys (prefixes only)")
    kl.add_argument("--tenant")
    kr = ks.add_parser("revoke", help="revoke a key")
    kr.add_argument("key_id")
    for p in (kc, kl, kr):
        p.set_defaults(func=cmd_keys)
    hc = sub.add_parser("health", help="exit 0 when the part on this host answers (container healthchecks)")
    hc.add_argument("part", choices=["api", "inference", "worker"])
    hc.add_argument(
        "target", nargs="?", help="api: the /healthz URL; inference: HOST:PORT (default: this host's)"
    )
    hc.set_defaults(func=cmd_health)
    dm = sub.add_parser(
        "demo", help="all-in-one server + a 3-step job on tiny models over HTTP, with progress"
    )
    dm.add_argument("--data-dir", default=".demo/service", help="the demo server's data directory")
    dm.add_argument("--run-link", help="symlink to create at the job's run directory (for rlhf eval / chat)")
    dm.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: the bundled tiny OPT models (≈ 3 min); smollm2: SmolLM2-135M-Instruct with LoRA and a "
        "small reward model on its tokenizer (≈ 15 min on 2 cores)",
    )
    dm.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars in workers' logs
    if not argv or argv[0] not in SERVICE_COMMANDS:
        from rlhf_engine.cli import main as engine_main

        return engine_main(argv)
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the output
    from service.errors import ServiceError

    try:
        return int(ns.func(ns))
    except (ValueError, ServiceError) as e:
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
