"""The generated protobuf and gRPC modules, imported in one place with a clear error when missing."""

from __future__ import annotations

try:
    from service.grpc.gen.rlhf.internal.v1 import worker_pb2, worker_pb2_grpc
    from service.grpc.gen.rlhf.v1 import (
        chat_pb2,
        chat_pb2_grpc,
        jobs_pb2,
        jobs_pb2_grpc,
        models_pb2,
        models_pb2_grpc,
    )
except ImportError as e:  # pragma: no cover - a checkout that skipped the build
    raise ImportError(
        "the gRPC code is generated from proto/ at install: run `make proto` (python -m service.grpc.build)"
    ) from e

__all__ = [
    "chat_pb2",
    "chat_pb2_grpc",
    "jobs_pb2",
    "jobs_pb2_grpc",
    "models_pb2",
    "models_pb2_grpc",
    "worker_pb2",
    "worker_pb2_grpc",
]
