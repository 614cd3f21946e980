"""pydantic ↔ protobuf at the edge: `to_pb(model, Message)` and `from_pb(message, Model)`.

The proto messages mirror the pydantic contract field for field (`PAIRS`, checked by a test), so the
conversion goes through the JSON mapping: unset proto fields become "not given" (pydantic's defaults
apply), and numbers inside Struct/Value fields (which protobuf keeps as doubles) come back as ints
when they are whole, so `config.sft.max_steps: 5` reaches SFTConfig as 5, not 5.0.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel

from service import schemas
from service.grpc.pb import chat_pb2, jobs_pb2, models_pb2

M = TypeVar("M", bound=BaseModel)
P = TypeVar("P", bound=Message)

# pydantic model ↔ proto message, with the fields that differ on purpose
PAIRS: list[tuple[type[BaseModel], type[Message], set[str], set[str]]] = [
    # (model, message, only in the model, only in the message)
    (schemas.JobCreate, jobs_pb2.JobSpec, set(), set()),
    (schemas.EstimateRequest, jobs_pb2.EstimateJobRequest, set(schemas.JobCreate.model_fields), {"job"}),
    (schemas.Hyperparameters, jobs_pb2.Hyperparameters, set(), set()),
    (schemas.MethodParams, jobs_pb2.MethodParams, set(), set()),
    (schemas.DPOHyperparameters, jobs_pb2.DPOHyperparameters, set(), set()),
    (schemas.DPOMethodParams, jobs_pb2.DPOMethodParams, set(), set()),
    (schemas.ReinforcementHyperparameters, jobs_pb2.ReinforcementHyperparameters, set(), set()),
    (schemas.ReinforcementMethodParams, jobs_pb2.ReinforcementMethodParams, set(), set()),
    (schemas.Method, jobs_pb2.Method, set(), set()),
    (schemas.StepConfigs, jobs_pb2.StepConfigs, set(), set()),
    (schemas.JobObject, jobs_pb2.Job, set(), set()),
    (schemas.JobPhase, jobs_pb2.JobPhase, set(), set()),
    (schemas.JobError, jobs_pb2.JobError, set(), set()),
    (schemas.Cost, jobs_pb2.Cost, set(), set()),
    (schemas.JobList, jobs_pb2.ListJobsResponse, set(), set()),
    (schemas.EventObject, jobs_pb2.Event, set(), set()),
    (schemas.EventList, jobs_pb2.ListEventsResponse, set(), set()),
    (schemas.CheckpointObject, jobs_pb2.Checkpoint, set(), set()),
    (schemas.CheckpointList, jobs_pb2.ListCheckpointsResponse, set(), set()),
    (schemas.MetricPoint, jobs_pb2.MetricPoint, set(), set()),
    (schemas.MetricList, jobs_pb2.ListMetricsResponse, set(), set()),
    (schemas.RolloutList, jobs_pb2.ListRolloutsResponse, set(), set()),
    (schemas.Estimate, jobs_pb2.Estimate, set(), set()),
    (schemas.StepEstimate, jobs_pb2.StepEstimate, set(), set()),
    (schemas.StepMemory, jobs_pb2.StepMemory, set(), set()),
    (schemas.ModelObject, models_pb2.Model, set(), set()),
    (schemas.ModelList, models_pb2.ListModelsResponse, set(), set()),
    # gRPC chat always streams (stream, stream_options are REST's SSE switches)
    (schemas.ChatCompletionRequest, chat_pb2.ChatRequest, {"stream", "stream_options"}, set()),
    (schemas.ChatMessage, chat_pb2.ChatMessage, set(), set()),
    (schemas.ChatCompletionChunk, chat_pb2.ChatChunk, {"system_fingerprint"}, set()),
    (schemas.ChatChunkChoice, chat_pb2.ChatChunkChoice, set(), set()),
    (schemas.ChoiceLogprobs, chat_pb2.ChoiceLogprobs, {"refusal"}, set()),
    (schemas.TokenLogprob, chat_pb2.TokenLogprob, set(), set()),
    (schemas.TopLogprob, chat_pb2.TopLogprob, set(), set()),
    (schemas.ChatDelta, chat_pb2.ChatDelta, set(), set()),
    (schemas.ToolCall, chat_pb2.ToolCall, set(), set()),
    (schemas.FunctionCall, chat_pb2.FunctionCall, set(), set()),
    (schemas.ToolCallDelta, chat_pb2.ToolCallDelta, set(), set()),
    (schemas.Usage, chat_pb2.Usage, set(), set()),
]


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


def to_dict(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = _whole(json_format.MessageToDict(message, preserving_proto_field_name=True))
    return out


def from_pb(message: Message, model: type[M], **extra: Any) -> M:
    """The pydantic model of a request message (ValidationError names the field, as over REST)."""
    return model.model_validate(to_dict(message) | extra)


def to_pb(model: BaseModel | dict[str, Any], message: type[P]) -> P:
    data = model.model_dump(mode="json") if isinstance(model, BaseModel) else model
    return json_format.ParseDict(data, message(), ignore_unknown_fields=True)
