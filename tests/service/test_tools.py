"""Tool calling end to end, as an OpenAI user runs it: OpenAI's function-calling fine-tuning rows uploaded
with the SDK, a supervised job on a tiny Llama (the bundled tokenizer, DeepSpeed-Chat's template: the Hermes
tool layout in its turns), and the fine-tuned model served — chat with `tools` (auto, required, named,
streamed), the SDK's tool-calling loop (the model calls, the client answers with a tool message, the
model replies), the Responses API with function tools, and gRPC."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import jsonschema
import pytest
from openai import OpenAI

from tests.helpers.tool_rows import TOOLS, question, rows
from tests.service.conftest import Stack, Workers, wait_for

pytestmark = pytest.mark.slow
BASE = "tiny-tools"  # placed in the model root as an operator would
SCHEMA = TOOLS[0]["function"]["parameters"]
SDK_TOOLS: Any = TOOLS  # as the SDK types them


@pytest.fixture(scope="module")
def served(e2e_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from rlhf_engine.models.tiny import build_tiny

    base = e2e_stack.settings.models_dir / BASE
    shutil.copytree(build_tiny("llama", "xs"), base, dirs_exist_ok=True)
    config = json.loads((base / "config.json").read_text())  # rotary: the tools' prompt (≈ 660 tokens) fits
    (base / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    workers = Workers(e2e_stack, tmp_path_factory.mktemp("tools-inference"))
    workers.start()
    key = e2e_stack.key("tools")
    yield {
        "key": key,
        "sdk": OpenAI(base_url=f"{e2e_stack.url}/v1", api_key=key, timeout=120, max_retries=0),
        "http": httpx.Client(base_url=e2e_stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=120),
        "tmp": tmp_path_factory.mktemp("tools"),
    }
    workers.stop()


@pytest.fixture(scope="module")
def model(served: dict[str, Any]) -> str:
    """A supervised job on 600 function-calling rows (OpenAI's format), through the SDK."""
    sdk: OpenAI = served["sdk"]
    data = served["tmp"] / "calls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(600)))
    file = sdk.files.create(file=data.open("rb"), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=BASE,
        training_file=file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
        extra_body={  # a tiny model learns faster with small steps and a large rate
            "config": {
                "sft": {
                    "per_device_train_batch_size": 8,
                    "gradient_accumulation_steps": 1,
                    "learning_rate": 3e-3,
                    "max_seq_len": 1024,
                }
            }
        },
    )
    done = wait_for(served["http"], job.id, ("succeeded", "failed", "cancelled"), timeout=600)
    assert done["status"] == "succeeded", done
    return str(done["fine_tuned_model"])


def ask(sdk: OpenAI, model: str, text: str, **extra: Any) -> Any:
    deadline = time.monotonic() + 120
    while True:  # the worker loads the model on its first request
        try:
            return sdk.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": text}],
                tools=SDK_TOOLS,
                **{"temperature": 0, "max_tokens": 150} | extra,
            )
        except Exception as e:
            if "model_not_ready" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_model_fine_tuned_on_function_calling_rows_calls_the_right_tool(
    served: dict[str, Any], model: str
) -> None:
    sdk: OpenAI = served["sdk"]
    rng = random.Random(7)
    held_out = [question(rng, train=False) for _ in range(60)]  # phrasings never paired with that city
    ask(sdk, model, held_out[0][0])  # loaded
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: ask(sdk, model, q[0]), held_out))
    right = exact = 0
    for reply, (_, name, city) in zip(replies, held_out, strict=True):
        choice = reply.choices[0]
        calls = choice.message.tool_calls or []
        if choice.finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == name:
            args = json.loads(calls[0].function.arguments)
            jsonschema.validate(args, SCHEMA)
            right += 1
            exact += args == {"city": city}
            assert calls[0].id.startswith("call_") and choice.message.content is None
    print(f"held-out: right tool with valid arguments {right}/60, the asked city {exact}/60")
    assert right >= 48, right  # ≥ 80%


def test_the_sdk_tool_calling_loop(served: dict[str, Any], model: str) -> None:
    """The model calls, the client runs the tool and answers with a tool message, the model replies."""
    sdk: OpenAI = served["sdk"]
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.chat.completions.create(
        model=model, messages=messages, tools=SDK_TOOLS, temperature=0, max_tokens=150
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"  # type: ignore[union-attr]
    messages.append(first.choices[0].message)  # the assistant's turn, as the SDK returned it
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny"})
    second = sdk.chat.completions.create(
        model=model, messages=messages, tools=SDK_TOOLS, temperature=0, max_tokens=150
    )
    answer = second.choices[0]  # (a 0.4M-parameter model does not copy the city or the result: the shape)
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert (answer.message.content or "").strip().startswith("In "), answer.message.content
    # streamed: the call arrives as delta.tool_calls, then finish_reason tool_calls
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in sdk.chat.completions.create(
        model=model,
        messages=messages[:1],
        tools=SDK_TOOLS,
        temperature=0,
        max_tokens=150,
        stream=True,
    ):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                slot = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                slot["id"] += d.id or ""
                slot["name"] += d.function.name or "" if d.function else ""
                slot["arguments"] += d.function.arguments or "" if d.function else ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and [c["name"] for c in calls.values()] == ["get_weather"]
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)  # type: ignore[union-attr]


def test_required_and_named_calls_follow_the_schema(served: dict[str, Any], model: str) -> None:
    sdk: OpenAI = served["sdk"]
    for seed in range(3):  # sampled, and about something the model was never asked
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            reply = ask(sdk, model, "Tell me a story.", tool_choice=choice, temperature=1.0, seed=seed)
            calls = reply.choices[0].message.tool_calls
            assert reply.choices[0].finish_reason == "tool_calls" and calls, reply
            for call in calls:
                assert choice == "required" or call.function.name == "get_time"
                jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    none = ask(sdk, model, "What is the weather in Paris?", tool_choice="none")
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")


def test_the_responses_api_calls_function_tools(served: dict[str, Any], model: str) -> None:
    sdk: OpenAI = served["sdk"]
    tools: Any = [{"type": "function", **t["function"]} for t in TOOLS]
    first = sdk.responses.create(
        model=model, input="What time is it in Rome?", tools=tools, temperature=0, max_output_tokens=150
    )
    calls = [o for o in first.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_time", first.output
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMA)
    second = sdk.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "noon"}],
        tools=tools,
        temperature=0,
        max_output_tokens=150,
    )
    assert second.output_text.strip().startswith("In ") and second.status == "completed", second.output
    with sdk.responses.stream(
        model=model, input="What time is it in Rome?", tools=tools, temperature=0, max_output_tokens=150
    ) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response()
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    assert [o.type for o in final.output] == ["function_call"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "absent"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nope"}}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_tool_requests_name_the_field(served: dict[str, Any], body: dict[str, Any], param: str) -> None:
    r = served["http"].post(
        "/v1/chat/completions",
        json={"model": BASE, "messages": [{"role": "user", "content": "JSON weather?"}]} | body,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_grpc_chat_takes_tools_and_streams_the_calls(
    served: dict[str, Any], model: str, e2e_stack: Stack
) -> None:
    from google.protobuf import json_format, struct_pb2

    from service.grpc.pb import chat_pb2, chat_pb2_grpc
    from tests.service.test_security import grpc_channel

    with grpc_channel(e2e_stack) as channel:
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        request = chat_pb2.ChatRequest(
            model=model,
            messages=[chat_pb2.ChatMessage(role="user", content="What time is it in Oslo?")],
            tools=[json_format.ParseDict(t, struct_pb2.Struct()) for t in TOOLS],
            tool_choice=json_format.ParseDict("required", struct_pb2.Value()),
            max_tokens=150,
            temperature=0,
        )
        chunks = list(chat.Chat(request, metadata=[("authorization", f"Bearer {served['key']}")]))
    calls = [c for chunk in chunks for ch in chunk.choices for c in ch.delta.tool_calls]
    ends = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.HasField("finish_reason")]
    assert ends == ["tool_calls"] and len(calls) == 1 and calls[0].function.name == "get_time"
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMA)
