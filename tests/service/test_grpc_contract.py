"""The gRPC surface against the REST one: every RPC has its route and every route its RPC (or a
reason to stay REST-only), the proto messages carry the pydantic contract's fields, every proto
element is commented, and the generated code is up to date with proto/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.grpc.convert import PAIRS, from_pb, to_pb
from service.grpc.server import REST_ONLY, RPC_ROUTES

PROTO = Path(__file__).resolve().parents[2] / "proto"


def test_every_rest_route_has_an_rpc_and_every_rpc_a_route(tmp_path: Path) -> None:
    from service.api.app import create_app
    from service.grpc.pb import chat_pb2, jobs_pb2, models_pb2
    from service.settings import Settings

    app = create_app(Settings(data_dir=tmp_path))
    routes = {
        (m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops
    }  # the published API
    assert set(RPC_ROUTES.values()) | set(REST_ONLY) == routes
    assert not set(RPC_ROUTES.values()) & set(REST_ONLY)
    rpcs = {
        f"{s.name}.{m.name}"
        for f in (jobs_pb2, chat_pb2, models_pb2)
        for s in f.DESCRIPTOR.services_by_name.values()
        for m in s.methods
    }
    assert rpcs == set(RPC_ROUTES)


@pytest.mark.parametrize(
    ("model", "message", "only_model", "only_message"),
    PAIRS,
    ids=[f"{p[0].__name__}-{p[1].DESCRIPTOR.name}" for p in PAIRS],
)
def test_proto_messages_carry_the_schema_fields(
    model: type, message: type, only_model: set[str], only_message: set[str]
) -> None:
    fields = set(model.model_fields)  # type: ignore[attr-defined]
    proto = set(message.DESCRIPTOR.fields_by_name)  # type: ignore[attr-defined]
    assert fields - only_model == proto - only_message
    assert only_model <= fields and only_message <= proto


def test_a_job_request_survives_the_round_trip() -> None:
    from service.grpc.pb import jobs_pb2
    from service.schemas import JobCreate

    req = JobCreate.model_validate(
        {
            "model": "tiny-opt-xs",
            "reward_model": "tiny-opt-xs",
            "suffix": "x",
            "seed": 3,
            "hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": "auto"},
            "config": {"sft": {"max_steps": 5, "learning_rate": 0.001}},
            "metadata": {"a": "b"},
            "steps": [1, 2],
            "max_cost_usd": 2.5,
        }
    )
    back = from_pb(to_pb(req, jobs_pb2.JobSpec), JobCreate)
    assert back == req and isinstance(back.config.sft["max_steps"], int)  # type: ignore[union-attr]
    dpo = JobCreate.model_validate(
        {
            "model": "tiny-opt-xs",
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}},
            "config": {"dpo": {"loss": "ipo", "max_steps": 7}},
        }
    )
    back = from_pb(to_pb(dpo, jobs_pb2.JobSpec), JobCreate)
    assert back == dpo and back.method.dpo.hyperparameters.beta == 0.25  # type: ignore[union-attr]
    grader = {
        "type": "multi",
        "calculate_output": "0.5 * a + b",
        "graders": {
            "a": {
                "type": "string_check",
                "operation": "ilike",
                "input": "{{sample.output_text}}",
                "reference": "{{item.x}}",
            },
            "b": {
                "type": "text_similarity",
                "evaluation_metric": "rouge_l",
                "input": "{{sample.output_text}}",
                "reference": "{{item.y.z}}",
                "pass_threshold": 0.5,
            },
        },
    }
    graded = JobCreate.model_validate(
        {
            "model": "tiny-opt-xs",
            "method": {
                "type": "reinforcement",
                "reinforcement": {"grader": grader, "hyperparameters": {"n_epochs": 2}},
            },
            "config": {"ppo": {"algorithm": "rloo"}},
        }
    )
    back = from_pb(to_pb(graded, jobs_pb2.JobSpec), JobCreate)
    assert back == graded and back.method.reinforcement.grader == grader  # type: ignore[union-attr]


def test_every_proto_message_field_and_rpc_is_commented() -> None:
    files = sorted(PROTO.rglob("*.proto"))
    assert {f.relative_to(PROTO).as_posix() for f in files} >= {
        "rlhf/v1/jobs.proto",
        "rlhf/v1/chat.proto",
        "rlhf/v1/models.proto",
    }
    element = re.compile(r"^\s*(message \w+|service \w+|rpc \w+|(optional |repeated )?[\w.<>, ]+ \w+ = \d+;)")
    for f in files:
        lines = f.read_text().splitlines()
        for i, line in enumerate(lines):
            if element.match(line) and "oneof" not in line:
                assert lines[i - 1].strip().startswith("//"), (
                    f"{f.name}:{i + 1} has no comment: {line.strip()}"
                )
    assert "REST-only" in (PROTO / "rlhf/v1/jobs.proto").read_text()


def test_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    from service.grpc.build import OUT, build

    fresh = build(tmp_path / "gen")
    for path in fresh:
        rel = path.relative_to(tmp_path / "gen")
        assert (OUT / rel).read_text() == path.read_text(), f"{rel} is stale: run `make proto`"


def test_a_running_jobs_phase_reaches_grpc_as_rest_shows_it() -> None:
    from service.grpc.pb import jobs_pb2
    from service.jobs.queries import phase_object

    stored = {
        "name": "building_ops",
        "label": "building DeepSpeed ops",
        "step": 1,
        "since": 1000.0,
        "typical_s": 45.0,
        "bound_s": 300.0,
    }
    shown = phase_object(stored, now=1038.4)  # what the worker keeps, as REST shows it
    assert shown.description == "building DeepSpeed ops: 38 s, usually 45 s" and shown.elapsed_s == 38.4
    message = to_pb(shown, jobs_pb2.JobPhase)
    assert (message.name, message.step, message.started_at) == ("building_ops", 1, 1000)
    assert message.description == shown.description
    assert (message.elapsed_s, message.typical_s, message.bound_s) == (38.4, 45.0, 300.0)
