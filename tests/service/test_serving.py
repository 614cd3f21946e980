"""Serving end to end: an API server that cannot import torch (REST + gRPC), real inference workers
(subprocesses on loopback gRPC), PostgreSQL, Redis, and the models of a real finished 3-step job.
Clients are the official `openai` package, httpx for SSE details, and a gRPC client.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from openai.types.graders import TextSimilarityGraderParam
from pydantic import BaseModel, ConfigDict, Field

from rlhf_engine.runtime.distributed import free_port
from service.db.models import FineTunedModel
from service.db.session import session_scope
from service.errors import NotFoundError
from service.schemas import ChatCompletionChunk
from tests.service.conftest import NO_ROLLOVER_S, SMALL_SFT, Stack, Workers, serve
from workers.local import wait_healthy

pytestmark = pytest.mark.slow
KITE = [{"role": "user", "content": "What is a kite?"}]
# KITE as the openai SDK types a conversation
SDK_KITE: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is a kite?"}]
LONG = 400  # tokens the noisy model generates without an end-of-text (checked in its fixture)


@dataclass
class Api:
    url: str
    grpc_address: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def api(e2e_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """`rlhf serve` (REST and gRPC) in a process where torch, transformers and deepspeed are blocked."""
    tmp = tmp_path_factory.mktemp("api")
    blocked = tmp / "blocked.log"
    port, gport = free_port(), free_port()
    # streamed tokens are counted per key (a limit high enough never to refuse anything here), in a window
    # that does not end during the tests (so a count read before a reply and after it are of one window)
    env = e2e_stack.env | {
        "RLHF_BLOCKED_LOG": str(blocked),
        "RLHF_CHAT_TOKENS_PER_MINUTE": str(10**9),
        "RLHF_RATE_WINDOW_S": str(NO_ROLLOVER_S),
    }
    with open(tmp / "api.log", "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.service.no_torch_api",
                "serve",
                "--port",
                str(port),
                "--grpc-port",
                str(gport),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    assert wait_healthy(url, proc, timeout_s=30), (tmp / "api.log").read_text()[-3000:]
    yield Api(url=url, grpc_address=f"127.0.0.1:{gport}", proc=proc, log=tmp / "api.log")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    assert not blocked.exists(), f"the API process tried to import {blocked.read_text()}"


@pytest.fixture(scope="module")
def workers(e2e_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    w = Workers(e2e_stack, tmp_path_factory.mktemp("inference"))
    w.first = w.start()  # type: ignore[attr-defined]
    yield w
    w.stop()


@pytest.fixture(scope="module")
def key(e2e_client: httpx.Client) -> str:
    return e2e_client.headers["Authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def model(e2e_finished: dict[str, Any]) -> str:
    return str(e2e_finished["job"]["fine_tuned_model"])


@pytest.fixture(scope="module")
def sdk(api: Api, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def noisy(e2e_stack: Stack) -> str:
    """A base model with random weights: greedy decoding runs LONG tokens without end-of-text (checked
    in process), so a stream is surely still running when a test kills its worker or hangs up."""
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams
    from rlhf_engine.models.tiny import write_tiny

    path = write_tiny(e2e_stack.settings.models_dir / "noisy", "opt", "xs", pretrain_steps=0, seed=7)
    with ChatGenerator.load(str(path)) as engine:
        done = engine.generate(KITE, SamplingParams(max_new_tokens=LONG, temperature=0))
    assert done.choices[0].finish_reason == "length"
    return "noisy"


def sse(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent-event stream."""
    event = "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            yield event, line.split(":", 1)[1].strip()
            event = "message"


# ---------------------------------------------------------------------------- REST, openai SDK


def test_openai_sdk_streams_and_completes_a_fine_tuned_model(
    sdk: openai.OpenAI, workers: Workers, model: str, e2e_stack: Stack
) -> None:
    from transformers import AutoTokenizer

    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams
    from rlhf_engine.data.formatter import encode_prompt

    chunks = list(
        sdk.chat.completions.create(
            model=model,
            messages=SDK_KITE,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert text.strip() and len(finish) == 1 and usage is not None and not chunks[-1].choices
    whole = sdk.chat.completions.create(model=model, messages=SDK_KITE, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.content == text
    assert whole.choices[0].finish_reason == finish[0]
    assert whole.usage is not None and (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
        whole.usage.total_tokens,
    ) == (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens + usage.completion_tokens)
    # the same reply as the chat generator in process, and token counts as the shared formatter counts them
    with session_scope(e2e_stack.settings.db_url) as s:
        path = s.get(FineTunedModel, model).path  # type: ignore[union-attr]
    assert usage.prompt_tokens == len(encode_prompt(KITE, AutoTokenizer.from_pretrained(path)))
    with ChatGenerator.load(path, score_replies=False) as engine:
        local = engine.generate(KITE, SamplingParams(max_new_tokens=24, temperature=0))
    assert local.choices[0].text == text and usage.completion_tokens == len(local.choices[0].token_ids)
    assert finish[0] == local.choices[0].finish_reason
    # n replies, seeded: a seed gives the same replies again
    two = [
        sdk.chat.completions.create(
            model=model, messages=SDK_KITE, max_tokens=12, n=2, seed=5, temperature=1.0
        )
        for _ in range(2)
    ]
    assert [c.message.content for c in two[0].choices] == [c.message.content for c in two[1].choices]
    assert len(two[0].choices) == 2 and two[0].usage.completion_tokens <= 24  # type: ignore[union-attr]


def test_models_are_listed_per_tenant_and_another_tenants_model_is_404(
    sdk: openai.OpenAI, api: Api, model: str, e2e_stack: Stack, workers: Workers
) -> None:
    ids = [m.id for m in sdk.models.list()]
    assert {model, f"{model}:sft", "tiny-opt-xs"} <= set(ids)
    other = openai.OpenAI(base_url=f"{api.url}/v1", api_key=e2e_stack.key("other-tenant"), max_retries=0)
    assert model not in [m.id for m in other.models.list()] and "tiny-opt-xs" in [
        m.id for m in other.models.list()
    ]
    with pytest.raises(openai.NotFoundError) as e:
        other.chat.completions.create(model=model, messages=SDK_KITE)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"  # type: ignore[index]


def test_the_api_process_runs_every_text_similarity_grader_without_torch(sdk: openai.OpenAI) -> None:
    """The API server (torch, transformers and deepspeed blocked, see the `api` fixture) grades samples
    itself: every metric's library loads there."""
    metric: Literal["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_5", "rouge_l"]
    for metric in ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_5", "rouge_l"):
        grader: TextSimilarityGraderParam = {
            "type": "text_similarity",
            "name": metric,
            "input": "{{sample.output_text}}",
            "reference": "{{item.ref}}",
            "evaluation_metric": metric,
        }
        out = sdk.fine_tuning.alpha.graders.run(
            grader=grader,
            model_sample="a kite flies high in the wind",
            item={"ref": "a kite flies high in the wind"},
        )
        assert out.reward == pytest.approx(1.0), (metric, out)


class Pet(BaseModel):
    """What `client.chat.completions.parse` is given: a pydantic model, sent as a strict JSON schema."""

    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict schemas have it
    name: str = Field(max_length=16)
    kind: Literal["dog", "cat", "owl"]
    age: int = Field(ge=0, le=30)
    toys: list[Literal["ball", "kite", "book"]] = Field(max_length=3)


def test_structured_outputs_parse_stream_and_share_a_batch_with_plain_replies(
    sdk: openai.OpenAI, model: str, workers: Workers
) -> None:
    """The SDK's `parse` returns the pydantic object; streamed replies under a schema concatenate to valid
    JSON; plain requests running beside them are unconstrained (the grammar is per row)."""
    import jsonschema

    asked: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Describe your pet as JSON."}]
    for seed in range(3):
        done = sdk.chat.completions.parse(
            model=model, messages=asked, response_format=Pet, max_tokens=200, seed=seed
        )
        pet = done.choices[0].message.parsed
        assert isinstance(pet, Pet) and done.choices[0].finish_reason == "stop", done
    schema = Pet.model_json_schema()
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}

    def shaped(seed: int) -> dict[int, str]:
        texts = {0: "", 1: ""}
        for chunk in sdk.chat.completions.create(
            model=model, messages=asked, response_format=fmt, max_tokens=200, seed=seed, n=2, stream=True
        ):
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
        return texts

    def plain() -> str | None:
        reply = sdk.chat.completions.create(model=model, messages=SDK_KITE, max_tokens=12, temperature=0)
        return reply.choices[0].message.content

    alone = plain()
    with ThreadPoolExecutor(4) as pool:  # constrained and plain requests in one continuous batch
        structured = [pool.submit(shaped, s) for s in range(2)]
        beside = [pool.submit(plain) for _ in range(2)]
        for f in structured:
            for text in f.result().values():
                jsonschema.validate(json.loads(text), schema)
        assert [f.result() for f in beside] == [alone, alone]  # untouched by their neighbours' masks
    anything = sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        seed=3,
    )
    text, end = anything.choices[0].message.content or "", anything.choices[0].finish_reason
    assert text.startswith("{"), text  # an object from the first token, whatever the model would say
    if end == "stop":  # (an open object may run to max_tokens)
        assert isinstance(json.loads(text), dict)


def test_logprobs_and_sampling_controls_equal_plain_transformers_through_the_sdk(
    sdk: openai.OpenAI, noisy: str, e2e_stack: Stack, workers: Workers
) -> None:
    """logprobs/top_logprobs (whole and streamed), logit_bias, presence/frequency penalties, seed and n
    through the official SDK, each equal to the same controls written out on plain transformers
    (tests/reference.py) on the served model's weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_engine.data.formatter import encode_prompt
    from tests.reference import decode

    path = e2e_stack.settings.models_dir / noisy
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = encode_prompt(KITE, tok)

    def ref(max_new: int, **controls: Any) -> tuple[str, list[int], list[Any]]:
        tokens, logps = decode(hf, prompt, max_new, eos={tok.eos_token_id}, **controls)
        return str(tok.decode(tokens, skip_special_tokens=True)), tokens, logps

    text, tokens, logps = ref(12)
    whole = sdk.chat.completions.create(
        model=noisy, messages=SDK_KITE, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = whole.choices[0]
    assert choice.message.content == text and choice.logprobs and choice.logprobs.content
    content = choice.logprobs.content
    assert len(content) == len(tokens)
    assert "".join(c.token for c in content) == text  # ASCII tokens: texts join to the reply
    for c, t, lp in zip(content, tokens, logps, strict=True):
        assert c.bytes == list(c.token.encode()) and c.logprob == pytest.approx(float(lp[t]), abs=1e-4)
        assert [x.logprob for x in c.top_logprobs] == pytest.approx(lp.topk(3).values.tolist(), abs=1e-4)
        assert c.top_logprobs[0].token == c.token  # greedy
    streamed: list[Any] = []
    for chunk in sdk.chat.completions.create(
        model=noisy,
        messages=SDK_KITE,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    ):
        for ch in chunk.choices:
            streamed += ch.logprobs.content or [] if ch.logprobs else []
    # the same tokens (the second prompt comes from the prompt cache: the values agree to float noise)
    assert [(c.token, c.bytes, [x.token for x in c.top_logprobs]) for c in streamed] == [
        (c.token, c.bytes, [x.token for x in c.top_logprobs]) for c in content
    ]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    plain = sdk.chat.completions.create(model=noisy, messages=SDK_KITE, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked: none

    bias = {str(tokens[0]): -100, str(tokens[2]): 5}
    biased = sdk.chat.completions.create(
        model=noisy, messages=SDK_KITE, max_tokens=12, temperature=0, logit_bias=bias
    )
    expected = ref(12, logit_bias={int(k): float(v) for k, v in bias.items()})[0]
    assert biased.choices[0].message.content == expected != text
    penalised = sdk.chat.completions.create(
        model=noisy,
        messages=SDK_KITE,
        max_tokens=30,
        temperature=0,
        presence_penalty=1.2,
        frequency_penalty=0.6,
    )
    assert penalised.choices[0].message.content == ref(30, presence_penalty=1.2, frequency_penalty=0.6)[0]
    sampled = sdk.chat.completions.create(
        model=noisy, messages=SDK_KITE, max_tokens=12, temperature=0.8, seed=5, n=2
    )
    assert [c.message.content for c in sampled.choices] == [
        ref(12, temperature=0.8, seed=5)[0],
        ref(12, temperature=0.8, seed=6)[0],
    ]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(
            model=noisy, messages=SDK_KITE, max_tokens=2, logit_bias={str(hf.config.vocab_size): 1}
        )
    assert e.value.body["param"] == "logit_bias" and "vocabulary" in e.value.body["message"]  # type: ignore[index]


def test_the_responses_api_through_the_sdk(
    sdk: openai.OpenAI, model: str, workers: Workers, e2e_stack: Stack, api: Api
) -> None:
    """responses.create/retrieve/stream/parse/delete and input_items.list of the official SDK, unchanged,
    against a fine-tuned model: a response is the chat turn with another envelope (the same text and
    token counts as chat.completions), previous_response_id continues the stored conversation for its
    tenant only."""

    def chat(messages: list[Any], max_tokens: int) -> Any:
        return sdk.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0
        )

    first = sdk.responses.create(model=model, input="What is a kite?", max_output_tokens=48, temperature=0)
    same = chat(SDK_KITE, 48)
    assert first.id.startswith("resp_") and first.status in ("completed", "incomplete")
    assert first.output_text == same.choices[0].message.content and first.output_text.strip()
    assert first.usage is not None and same.usage is not None
    assert (first.usage.input_tokens, first.usage.output_tokens) == (
        same.usage.prompt_tokens,
        same.usage.completion_tokens,
    )
    # instructions are the system turn; a list of messages (text parts too) is the conversation
    told = sdk.responses.create(
        model=model,
        instructions="Answer briefly.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is a kite?"}]}],
        max_output_tokens=32,
        temperature=0,
    )
    system = [{"role": "system", "content": "Answer briefly."}, *SDK_KITE]
    assert told.output_text == chat(system, 32).choices[0].message.content
    assert sdk.responses.retrieve(first.id).output_text == first.output_text
    # a continuation is the whole conversation (instructions are not carried over, as at OpenAI)
    second = sdk.responses.create(
        model=model, input="And a dog?", previous_response_id=told.id, max_output_tokens=32, temperature=0
    )
    whole = [
        *SDK_KITE,
        {"role": "assistant", "content": told.output_text},
        {"role": "user", "content": "And a dog?"},
    ]
    assert second.output_text == chat(whole, 32).choices[0].message.content
    assert second.previous_response_id == told.id
    items = sdk.responses.input_items.list(second.id)
    listed = [i.model_dump() for i in items.data]
    assert [(i["type"], i["role"], i["content"][0]["text"]) for i in listed] == [
        ("message", "user", "And a dog?")
    ]
    # streamed: OpenAI's typed events in order, the same text
    with sdk.responses.stream(model=model, input="What is a kite?", max_output_tokens=48, temperature=0) as s:
        kinds = [e.type for e in s]
        final = s.get_final_response() if kinds[-1] == "response.completed" else None
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert "response.output_text.delta" in kinds
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] == ("response.completed" if first.status == "completed" else "response.incomplete")
    if final is not None:
        assert final.output_text == first.output_text
    # structured: the SDK's parse with a pydantic model
    for seed in range(2):
        pet = sdk.responses.parse(
            model=model,
            input="Describe your pet as JSON.",
            text_format=Pet,
            max_output_tokens=200,
            temperature=seed,
        )
        assert isinstance(pet.output_parsed, Pet), pet
    # cut by max_output_tokens: incomplete, with the reason
    cut = sdk.responses.create(model=model, input="What is a kite?", max_output_tokens=1, temperature=0)
    assert (
        cut.status == "incomplete"
        and cut.incomplete_details
        and cut.incomplete_details.reason == "max_output_tokens"
    )
    # store: false is answered, not kept; delete removes
    unkept = sdk.responses.create(model=model, input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unkept.id)
    sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(first.id)
    # another tenant cannot see, continue or delete a response
    other = openai.OpenAI(base_url=f"{api.url}/v1", api_key=e2e_stack.key("responses-other"), max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        other.responses.create(
            model="tiny-opt-xs", input="Hi", previous_response_id=second.id, max_output_tokens=2
        )
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    for call in (other.responses.retrieve, other.responses.delete, other.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            call(second.id)
    assert sdk.responses.retrieve(second.id).id == second.id  # still there for its owner


def test_stored_responses_are_bounded_per_tenant(e2e_stack: Stack) -> None:
    from service.schemas import ResponseCreateRequest
    from service.services import responses as svc

    settings = e2e_stack.settings.model_copy(update={"responses_max_stored": 3})
    for tenant in ("bounded-a", "bounded-b"):
        e2e_stack.key(tenant)
    req = ResponseCreateRequest(model="m", input="hi")
    kept: dict[str, list[str]] = {"bounded-a": [], "bounded-b": []}
    for i in range(5):
        for tenant in ["bounded-a", "bounded-b"] if i < 2 else ["bounded-a"]:
            with session_scope(settings.db_url) as s:
                turn = svc.prepare(session=s, tenant=tenant, req=req)
                out = svc.response_object(
                    req=req,
                    response_id=svc.new_id("resp"),
                    message_id=svc.new_id("msg"),
                    created=0,
                    model="m",
                    text=f"reply {i}",
                    finish_reason="stop",
                    prompt_tokens=1,
                    completion_tokens=1,
                )
                svc.store(
                    session=s, tenant=tenant, body=out, turn=turn, reply=f"reply {i}", settings=settings
                )
                kept[tenant].append(out.id)

    def there(tenant: str, response_id: str) -> bool:
        with session_scope(settings.db_url) as s:
            try:
                svc.get(session=s, tenant=tenant, response_id=response_id)
                return True
            except NotFoundError:
                return False

    assert [there("bounded-a", r) for r in kept["bounded-a"]] == [False, False, True, True, True]  # oldest go
    assert all(there("bounded-b", r) for r in kept["bounded-b"])  # another tenant's are not touched


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "input"),
        ({"input": "kite " * 600}, "input"),  # longer than the context
        ({"max_output_tokens": 10**7}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        (
            {"text": {"format": {"type": "json_schema", "name": "a", "schema": {"$ref": "#/$defs/x"}}}},
            "text.format.schema",
        ),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "name": "f"}] * 2}, "tools[1].name"),
        ({"previous_response_id": "resp_nope"}, "previous_response_id"),
        ({"model": "no-such-model"}, "model"),
    ],
)
def test_bad_response_requests_name_the_field(
    api: Api, key: str, model: str, workers: Workers, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(
        f"{api.url}/v1/responses",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        json={"model": model, "input": "What is a kite?"} | body,
    )
    assert r.status_code in (400, 404), r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split("[")[0].split(".")[0] in error["message"], error


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"messages": []}, 400, "messages"),
        ({"max_tokens": 10**7}, 400, "max_tokens"),
        ({"max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ({"n": 99}, 400, "n"),
        ({"temperature": 3}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, 400, "tools[1].function.name"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]"),  # no tool_call_id
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            400,
            "messages",
        ),
        (
            {"messages": [{"role": "user", "content": "kite " * 600}]},
            400,
            "messages",
        ),  # longer than the context
        ({"max_tokens": 500, "messages": [{"role": "user", "content": "kite " * 60}]}, 400, "max_tokens"),
        ({"model": "no-such-model"}, 404, "model"),
        ({"model": "../etc"}, 400, "model"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"$ref": "#/$defs/missing"}},
                }
            },
            400,
            "response_format.json_schema.schema",
        ),  # a schema the grammar engine cannot compile
        ({"response_format": {"type": "json_object"}}, 400, "messages"),  # OpenAI's rule: say "JSON"
        ({"response_format": {"type": "xml"}}, 400, "response_format.type"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ({"logit_bias": {"kite": 1}}, 400, "logit_bias"),
        ({"logit_bias": {"5": 101}}, 400, "logit_bias"),
        ({"presence_penalty": 2.5}, 400, "presence_penalty"),
        ({"frequency_penalty": -2.5}, 400, "frequency_penalty"),
    ],
)
def test_bad_chat_requests_get_a_clear_4xx(
    api: Api, key: str, model: str, workers: Workers, body: dict[str, Any], status: int, param: str
) -> None:
    r = httpx.post(
        f"{api.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        json={"model": model, "messages": KITE, "stream": True} | body,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param.split("[")[0] in error["message"], error


def test_malformed_oversized_and_unauthenticated_requests(api: Api, key: str, model: str) -> None:
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    r = httpx.post(f"{api.url}/v1/chat/completions", headers=auth, content=b'{"model": "x", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["message"]
    huge = json.dumps({"model": model, "messages": [{"role": "user", "content": "a" * (2 << 20)}]})
    r = httpx.post(f"{api.url}/v1/chat/completions", headers=auth, content=huge)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.post(f"{api.url}/v1/chat/completions", json={"model": model, "messages": KITE})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


# ---------------------------------------------------------------------------- routing and failures


def _tar(directory: Path) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for p in directory.iterdir():
            if p.is_file() and p.suffix != ".md":
                tf.add(p, arcname=p.name)
    return buf.getvalue()


def test_two_tenants_uploading_the_same_name_chat_with_their_own_model(
    api: Api, e2e_stack: Stack, workers: Workers, noisy: str
) -> None:
    """Uploaded names are unique per tenant only; workers must not mix their engines."""
    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams

    models = e2e_stack.settings.models_dir
    replies = {}
    for tenant, source in (("up-a", models / noisy), ("up-b", models / "tiny-opt-xs")):
        auth = {"Authorization": f"Bearer {e2e_stack.key(tenant)}"}
        up = httpx.post(
            f"{api.url}/v1/models",
            headers=auth,
            files={"file": ("m.tar.gz", _tar(source))},
            data={"name": "mine"},
            timeout=60,
        )
        assert up.status_code == 200, up.text
        r = httpx.post(
            f"{api.url}/v1/chat/completions",
            headers=auth,
            timeout=60,
            json={"model": "mine", "messages": KITE, "max_tokens": 8, "temperature": 0},
        )
        assert r.status_code == 200 and r.json()["model"] == "mine", r.text
        with ChatGenerator.load(str(source), score_replies=False) as engine:
            own = engine.generate(KITE, SamplingParams(max_new_tokens=8, temperature=0)).choices[0].text
        replies[tenant] = (r.json()["choices"][0]["message"]["content"], own)
    assert replies["up-a"][0] == replies["up-a"][1] and replies["up-b"][0] == replies["up-b"][1]
    assert replies["up-a"][0] != replies["up-b"][0]


def test_every_architecture_and_a_real_checkpoint_are_served_as_the_engine_answers(
    sdk: openai.OpenAI, workers: Workers, e2e_stack: Stack, smollm2: Path
) -> None:
    """Base models of every architecture of the kit, and SmolLM2-135M-Instruct, through
    /v1/chat/completions: the same greedy reply as the chat generator in process (which equals plain
    `generate`: tests/rlhf_engine/chat/test_architectures.py, tests/rlhf_engine/test_smollm2.py)."""
    import shutil

    from rlhf_engine.chat.generator import ChatGenerator
    from rlhf_engine.config.chat import SamplingParams
    from rlhf_engine.models.tiny import ARCHS, write_tiny

    models = e2e_stack.settings.models_dir
    names = []
    for arch in ARCHS:
        write_tiny(models / f"base-{arch}", arch, "xs", pretrain_steps=0)
        names.append(f"base-{arch}")
    shutil.copytree(smollm2, models / "smollm2-135m-instruct")
    names.append("smollm2-135m-instruct")
    france = [{"role": "user", "content": "What is the capital of France?"}]
    for name in names:
        reply = sdk.chat.completions.create(model=name, messages=france, max_tokens=16, temperature=0)  # type: ignore[arg-type]
        with ChatGenerator.load(str(models / name), score_replies=False) as engine:
            local = engine.generate(france, SamplingParams(max_new_tokens=16, temperature=0)).choices[0]
        assert reply.choices[0].message.content == local.text, name
        assert reply.usage is not None and reply.usage.completion_tokens == len(local.token_ids), name
    assert "Paris" in (reply.choices[0].message.content or "")  # the real model knows


def test_a_bundled_model_not_built_yet_is_listed_not_ready_and_answers_503_at_once(
    sdk: openai.OpenAI, api: Api, key: str, workers: Workers, e2e_stack: Stack
) -> None:
    """Bundled tiny models are built on first use (the `m` ones for many minutes): meanwhile the model
    is listed with ready=false and a chat answers 503 + Retry-After at once, not after a 300 s timeout."""
    name = "tiny-qwen3-xs"
    assert not (e2e_stack.settings.models_dir / name).exists()
    assert {m.id: m.model_extra.get("ready") for m in sdk.models.list()}[name] is False  # type: ignore[union-attr]
    body = {"model": name, "messages": KITE, "max_tokens": 4}
    started = time.monotonic()
    r = httpx.post(
        f"{api.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )
    assert time.monotonic() - started < 10
    assert r.status_code == 503 and r.headers["retry-after"] == str(e2e_stack.settings.retry_after_s)
    assert r.json()["error"]["code"] == "model_not_ready" and name in r.json()["error"]["message"]
    deadline = time.monotonic() + 240  # the worker builds it meanwhile; a later request is answered
    while True:
        r = httpx.post(
            f"{api.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready", r.text
        assert time.monotonic() < deadline, "the bundled model was never built"
        time.sleep(1)
    assert r.json()["usage"]["completion_tokens"] > 0
    assert {m.id: m.model_extra.get("ready") for m in sdk.models.list()}[name] is True  # type: ignore[union-attr]


def test_two_workers_serve_their_own_models(sdk: openai.OpenAI, workers: Workers, model: str) -> None:
    first = workers.first  # type: ignore[attr-defined]
    sdk.chat.completions.create(model=model, messages=KITE, max_tokens=4)  # type: ignore[arg-type]
    assert workers.holding(model) == [first]
    second = workers.start()
    reply = sdk.chat.completions.create(model=f"{model}:sft", messages=KITE, max_tokens=8, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content and reply.model == f"{model}:sft"
    assert workers.holding(f"{model}:sft") == [second]  # the idle worker loaded it; the first kept its model
    for _ in range(3):
        sdk.chat.completions.create(model=model, messages=KITE, max_tokens=4)  # type: ignore[arg-type]
        sdk.chat.completions.create(model=f"{model}:sft", messages=KITE, max_tokens=4)  # type: ignore[arg-type]
    assert workers.holding(model) == [first] and workers.holding(f"{model}:sft") == [second]
    assert workers.row(second).models == [f"{model}:sft"]  # type: ignore[union-attr]


def _tokens_counted(stack: Stack, key: str) -> int:
    """The streamed tokens the `api` process has counted for `key` (what RLHF_CHAT_TOKENS_PER_MINUTE
    checks), in its window that outlasts the tests."""
    import asyncio

    from service.limits import Counter, rate_key

    settings = stack.settings.model_copy(update={"rate_window_s": NO_ROLLOVER_S})
    return asyncio.run(Counter(settings).add(f"tok:{rate_key('Bearer ' + key)}", 0))[0]


def test_a_client_that_hangs_up_stops_generation(
    api: Api, key: str, workers: Workers, noisy: str, e2e_stack: Stack
) -> None:
    before = _tokens_counted(e2e_stack, key)
    body = {"model": noisy, "messages": KITE, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST",
        f"{api.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for event, data in sse(r):
            chunk = ChatCompletionChunk.model_validate_json(data)  # the contract's shape
            if event == "message" and chunk.choices[0].delta.content:
                break  # first text: hang up
    [pid] = workers.holding(noisy)
    deadline = time.monotonic() + 20
    while " noisy: cancelled;" not in workers.log(pid):
        assert time.monotonic() < deadline, workers.log(pid)[-2000:]
        time.sleep(0.1)
    line = next(x for x in workers.log(pid).splitlines() if " noisy: cancelled;" in x)
    assert int(line.split(" + ")[1].split()[0]) < LONG  # stopped early, not run to max_tokens
    # the tokens it did generate count against the key's per-minute limit (hanging up is no way around it)
    deadline = time.monotonic() + 10
    while (counted := _tokens_counted(e2e_stack, key) - before) == 0:
        assert time.monotonic() < deadline, "the abandoned reply's tokens were not counted"
        time.sleep(0.2)
    assert 0 < counted < LONG


def test_killing_the_worker_mid_stream_ends_with_an_error_event(
    api: Api, key: str, workers: Workers, noisy: str
) -> None:
    body = {"model": noisy, "messages": KITE, "max_tokens": LONG, "temperature": 0, "stream": True}
    events: list[tuple[str, str]] = []
    with httpx.stream(
        "POST",
        f"{api.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as r:
        for event, data in sse(r):
            events.append((event, data))
            if len(events) == 2:  # the first text is out: kill whoever is generating it
                for pid in workers.holding(noisy):
                    os.kill(pid, signal.SIGKILL)
    assert events[-1] == ("message", "[DONE]")
    event, data = events[-2]
    assert event == "error" and json.loads(data)["error"]["code"] == "worker_lost", events[-3:]
    # the dead worker's row is still fresh: the next request skips it and another worker serves
    reply = httpx.post(
        f"{api.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        json={"model": noisy, "messages": KITE, "max_tokens": 5, "temperature": 0},
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5, reply.text


def test_a_slow_reply_times_out_cleanly(
    e2e_stack: Stack, api: Api, key: str, workers: Workers, noisy: str
) -> None:
    body = {"model": noisy, "messages": KITE, "max_tokens": LONG, "temperature": 0}
    auth = {"Authorization": f"Bearer {key}"}
    warm = httpx.post(
        f"{api.url}/v1/chat/completions", json=body | {"max_tokens": 1}, headers=auth, timeout=60
    )
    assert warm.status_code == 200  # loaded: the limit below is spent generating, not loading
    url, stop = serve(
        e2e_stack.settings.model_copy(update={"chat_timeout_s": 0.1})
    )  # LONG tokens take longer
    try:
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body | {"stream": True}, headers=auth, timeout=60
        ) as s:
            events = list(sse(s))
        assert events[-1] == ("message", "[DONE]") and events[-2][0] == "error"
        assert json.loads(events[-2][1])["error"]["code"] == "timeout"
    finally:
        stop()


def test_a_worker_with_a_token_serves_only_callers_that_send_it(workers: Workers) -> None:
    from service.grpc.pb import worker_pb2, worker_pb2_grpc

    pid = workers.start(RLHF_INFERENCE_TOKEN="s3cret")
    row = workers.row(pid)
    assert row is not None
    request = worker_pb2.GenerateRequest(
        model_id="x",
        model_path="/etc",
        messages=[worker_pb2.Turn(role="user", content="hi")],
        temperature=1,
        top_p=1,
        n=1,
    )
    try:
        with grpc.insecure_channel(row.address) as ch:
            stub = worker_pb2_grpc.InferenceWorkerStub(ch)
            for metadata in (None, [("x-worker-token", "wrong")]):
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.Generate(request, metadata=metadata, timeout=30))
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as e:  # with the token it gets as far as refusing the path
                list(stub.Generate(request, metadata=[("x-worker-token", "s3cret")], timeout=30))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "outside" in (
                e.value.details() or ""
            )
    finally:
        os.killpg(pid, signal.SIGTERM)
        workers.procs[pid][0].wait(timeout=30)
    assert workers.row(pid) is None  # a clean stop removes its registration


def test_no_live_worker_is_503_with_retry_after(e2e_stack: Stack, key: str, tmp_path: Path) -> None:
    from service.settings import Settings

    lonely = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'rlhf.db'}")
    url, stop = serve(lonely)
    try:
        from service.services.keys import create_key

        with session_scope(lonely.db_url) as s:
            k = create_key(session=s, tenant="t")[1]
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "tiny-opt-xs", "messages": KITE},
            headers={"Authorization": f"Bearer {k}"},
        )
        assert (
            r.status_code == 503
            and r.headers["Retry-After"] == "5"
            and r.json()["error"]["code"] == "no_worker"
        )
        assert "rlhf worker inference" in r.json()["error"]["message"]
    finally:
        stop()


# ---------------------------------------------------------------------------- gRPC


@pytest.fixture(scope="module")
def channel(api: Api) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(api.grpc_address) as ch:
        yield ch


def test_grpc_every_rpc_and_a_model_finished_after_the_workers_started(
    channel: grpc.Channel, key: str, e2e_stack: Stack, e2e_finished: dict[str, Any], workers: Workers
) -> None:
    from google.protobuf import json_format, struct_pb2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from service.grpc.pb import chat_pb2, chat_pb2_grpc, jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc

    md = [("authorization", f"Bearer {key}")]
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    spec = json_format.ParseDict(SMALL_SFT | {"suffix": "grpc"}, jobs_pb2.JobSpec())

    est = jobs.EstimateJob(jobs_pb2.EstimateJobRequest(job=spec), metadata=md)
    assert est.object == "fine_tuning.job.estimate" and est.seconds > 0 and [s.step for s in est.steps] == [1]
    job = jobs.CreateJob(jobs_pb2.CreateJobRequest(job=spec, idempotency_key="grpc-1"), metadata=md)
    assert job.status == "queued" and job.id.startswith("ftjob-") and list(job.steps) == [1]
    assert (
        jobs.CreateJob(jobs_pb2.CreateJobRequest(job=spec, idempotency_key="grpc-1"), metadata=md).id
        == job.id
    )
    assert jobs.GetJob(jobs_pb2.GetJobRequest(id=job.id), metadata=md).model == "tiny-opt-xs"
    assert job.id in [j.id for j in jobs.ListJobs(jobs_pb2.ListJobsRequest(limit=100), metadata=md).data]

    updates = list(jobs.WatchJob(jobs_pb2.WatchJobRequest(id=job.id), metadata=md, timeout=240))
    kinds = [u.WhichOneof("update") for u in updates]
    assert kinds[-1] == "job" and "event" in kinds and "metric" in kinds
    done = updates[-1].job
    assert done.status == "succeeded" and done.fine_tuned_model == f"ft:tiny-opt-xs:grpc:{job.id}"
    events = [u.event for u in updates if u.HasField("event")]
    assert events[0].data["event_type"] == "job_created" and events[-1].data["event_type"] == "job_succeeded"
    listed = jobs.ListEvents(jobs_pb2.ListEventsRequest(id=job.id, limit=100), metadata=md).data
    assert {e.id for e in listed} == {e.id for e in events}
    assert jobs.ListCheckpoints(jobs_pb2.ListCheckpointsRequest(id=job.id), metadata=md).data[0].step == 1
    metrics = jobs.ListMetrics(jobs_pb2.ListMetricsRequest(id=job.id, step=1), metadata=md).data
    assert [m.global_step for m in metrics] == [m.metric.global_step for m in updates if m.HasField("metric")]
    three = e2e_finished["job"]["id"]
    rollouts = jobs.ListRollouts(jobs_pb2.ListRolloutsRequest(id=three, limit=3), metadata=md)
    assert len(rollouts.data) == 3 and "reward" in rollouts.data[0]

    # the model did not exist when the workers started; chat with it at once
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    chunks = list(
        chat.Chat(
            chat_pb2.ChatRequest(
                model=done.fine_tuned_model,
                messages=[chat_pb2.ChatMessage(role="user", content="What is a kite?")],
                max_tokens=16,
                temperature=0,
            ),
            metadata=md,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage.completion_tokens <= 16 and chunks[-1].usage.prompt_tokens > 0
    # structured outputs over gRPC: response_format as a Struct, the reply valid under the schema
    schema = Pet.model_json_schema()
    shape = json_format.ParseDict(
        {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema}}, struct_pb2.Struct()
    )
    pet = chat.Chat(
        chat_pb2.ChatRequest(
            model=done.fine_tuned_model,
            messages=[chat_pb2.ChatMessage(role="user", content="Describe your pet.")],
            max_tokens=200,
            seed=1,
            response_format=shape,
        ),
        metadata=md,
    )
    Pet.model_validate_json("".join(c.choices[0].delta.content for c in pet if c.choices))
    # log-probabilities and sampling controls over gRPC: one per token, the same text as REST
    scored = list(
        chat.Chat(
            chat_pb2.ChatRequest(
                model=done.fine_tuned_model,
                messages=[chat_pb2.ChatMessage(role="user", content="What is a kite?")],
                max_tokens=16,
                temperature=0,
                logprobs=True,
                top_logprobs=2,
                logit_bias={"5": -100},
                presence_penalty=0.5,
            ),
            metadata=md,
        )
    )
    content = [lp for c in scored for ch in c.choices for lp in ch.logprobs.content]
    assert len(content) == scored[-1].usage.completion_tokens
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in content)

    models = models_pb2_grpc.ModelServiceStub(channel)
    assert done.fine_tuned_model in [
        m.id for m in models.ListModels(models_pb2.ListModelsRequest(), metadata=md).data
    ]
    assert (
        models.GetModel(models_pb2.GetModelRequest(id=done.fine_tuned_model), metadata=md).owned_by == "e2e"
    )

    # transitions: pause a queued job, resume it, cancel it; a finished job cannot be cancelled
    other = jobs.CreateJob(jobs_pb2.CreateJobRequest(job=spec), metadata=md)
    paused = jobs.PauseJob(jobs_pb2.GetJobRequest(id=other.id), metadata=md)
    assert paused.status in ("paused", "running")  # a running job pauses at its next checkpoint
    if paused.status == "paused":
        assert jobs.ResumeJob(jobs_pb2.GetJobRequest(id=other.id), metadata=md).status == "queued"
    assert jobs.CancelJob(jobs_pb2.GetJobRequest(id=other.id), metadata=md).status == "cancelled"
    with pytest.raises(grpc.RpcError) as e:
        jobs.CancelJob(jobs_pb2.GetJobRequest(id=job.id), metadata=md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="rlhf.v1.JobService")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    [answer] = list(
        reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {
        "rlhf.v1.JobService",
        "rlhf.v1.ChatService",
        "rlhf.v1.ModelService",
        "grpc.health.v1.Health",
    } <= names


def test_grpc_errors_use_the_one_table(
    channel: grpc.Channel, key: str, model: str, e2e_stack: Stack, workers: Workers
) -> None:
    from service.grpc.pb import chat_pb2, chat_pb2_grpc, jobs_pb2, jobs_pb2_grpc, models_pb2, models_pb2_grpc

    md = [("authorization", f"Bearer {key}")]
    other = [("authorization", f"Bearer {e2e_stack.key('grpc-other')}")]
    jobs, chat = jobs_pb2_grpc.JobServiceStub(channel), chat_pb2_grpc.ChatServiceStub(channel)
    msgs = [chat_pb2.ChatMessage(role="user", content="hi")]

    def code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        with pytest.raises(grpc.RpcError) as e:
            result = call()
            if hasattr(result, "__iter__"):
                list(result)
        return e.value.code(), e.value.details(), dict(e.value.trailing_metadata() or ())

    c, details, meta = code(lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest()))
    assert c == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
    c, details, meta = code(
        lambda: jobs.CreateJob(
            jobs_pb2.CreateJobRequest(job=jobs_pb2.JobSpec(model="tiny-opt-xs", suffix="bad suffix!")),
            metadata=md,
        )
    )
    assert c == grpc.StatusCode.INVALID_ARGUMENT and meta["error-param"] == "suffix" and "suffix" in details
    c, details, meta = code(
        lambda: chat.Chat(chat_pb2.ChatRequest(model=model, messages=msgs, n=99), metadata=md)
    )
    assert c == grpc.StatusCode.INVALID_ARGUMENT and meta["error-param"] == "n"
    c, _, meta = code(
        lambda: chat.Chat(chat_pb2.ChatRequest(model=model, messages=msgs, top_logprobs=3), metadata=md)
    )
    assert c == grpc.StatusCode.INVALID_ARGUMENT and meta["error-param"] == "top_logprobs"
    c, details, meta = code(
        lambda: chat.Chat(chat_pb2.ChatRequest(model=model, messages=msgs, max_tokens=600), metadata=md)
    )
    assert (
        c == grpc.StatusCode.INVALID_ARGUMENT
        and meta["error-param"] == "max_tokens"
        and "max_tokens" in details
    )
    c, _, meta = code(lambda: chat.Chat(chat_pb2.ChatRequest(model=model, messages=msgs), metadata=other))
    assert c == grpc.StatusCode.NOT_FOUND and meta["error-param"] == "model"
    c, _, _ = code(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(id="ftjob-nope"), metadata=md))
    assert c == grpc.StatusCode.NOT_FOUND
    c, _, _ = code(
        lambda: models_pb2_grpc.ModelServiceStub(channel).GetModel(
            models_pb2.GetModelRequest(id=model), metadata=other
        )
    )
    assert c == grpc.StatusCode.NOT_FOUND
    c, _, meta = code(lambda: jobs.ListEvents(jobs_pb2.ListEventsRequest(id="x", limit=1000), metadata=md))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and meta["error-param"] == "limit"
