"""Tool calls in the engine: how a conversation with tools renders in each template style (Hermes-native,
Llama-3-native, and the Hermes layout written into the turns of a template without tools), calls read back
from a streamed reply, and `tool_choice` required / named enforced by constrained decoding so that every
call's arguments follow the tool's schema — on a tiny random-ish model that was never taught tools."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.chat.errors import ChatRequestError
from rlhf_engine.data.formatter import render_answer, render_prompt
from rlhf_engine.data.tools import Reader, parse, style_of
from rlhf_engine.data.types import Message

TEMPLATES = Path(__file__).parents[2] / "helpers" / "templates"
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS: list[dict[str, Any]] = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL: dict[str, Any] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
}
LOOP: list[dict[str, Any]] = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 and sunny"},
]


def with_template(base: Path, dest: Path, template: str) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(base, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tok.chat_template = (TEMPLATES / template).read_text()
    tok.save_pretrained(dest)
    config = json.loads((dest / "config.json").read_text())  # rotary positions: Llama 3's long preamble fits
    (dest / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 1024}))
    return dest


@pytest.fixture(scope="module")
def models(base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with SmolLM2's tokenizer and chat template (ChatML, no tools: the house layout), and
    copies with Qwen2.5's and Llama 3.1's templates; the tiny OPT (DeepSpeed-Chat's layout) to render."""
    from rlhf_engine.models.tiny import build_tiny

    smol = build_tiny("llama", "xs", tokenizer_from="smollm2")
    root = tmp_path_factory.mktemp("templates")
    return {
        "opt": base_model,
        "house": smol,
        "hermes": with_template(smol, root / "qwen", "qwen2_5.jinja"),
        "llama3": with_template(smol, root / "llama", "llama3_1_json.jinja"),
        "chatml": with_template(smol, root / "chatml", "chatml.jinja"),
    }


@pytest.fixture(scope="module")
def engines(models: dict[str, Path]) -> Iterator[dict[str, ChatGenerator]]:
    out = {
        k: ChatGenerator.load(str(models[k]), backend="transformers") for k in ("house", "hermes", "llama3")
    }
    yield out
    for e in out.values():
        e.close()


def test_each_template_style_renders_tools_calls_and_results(models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = {k: AutoTokenizer.from_pretrained(p) for k, p in models.items()}
    assert {k: style_of(t) for k, t in tok.items()} == {
        "opt": "house",
        "house": "house",
        "hermes": "hermes",
        "llama3": "llama3",
        "chatml": "house",
    }
    # a template that writes tools renders them itself
    assert render_prompt(LOOP, tok["hermes"], TOOLS) == tok["hermes"].apply_chat_template(
        [
            *ASK,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}},
                    }
                ],
            },
            LOOP[2],
        ],
        tools=list[Any](TOOLS),
        tokenize=False,
        add_generation_prompt=True,
    )
    llama = render_prompt(LOOP, tok["llama3"], TOOLS)
    assert (
        '"name": "get_weather"' in llama
        and '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}' in llama
    )
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"output": "18 and sunny"}' in llama
    # without tool support, the Hermes layout in plain turns: under ChatML it is Qwen2.5's own text
    # (but for Qwen's default system line, which only Qwen's template adds)
    system = [{"role": "system", "content": "Be brief."}]
    chatml = render_prompt(system + LOOP, tok["chatml"], TOOLS)
    assert chatml == render_prompt(system + LOOP, tok["hermes"], TOOLS)
    answer = Message("assistant", "", (("call_2", "get_time", '{"zone": 1}'),))
    assert render_answer(system + ASK, answer, tok["chatml"], TOOLS) == render_answer(
        system + ASK, answer, tok["hermes"], TOOLS
    )
    house = render_prompt(LOOP, tok["opt"], TOOLS)  # DeepSpeed-Chat's layout, the same blocks
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    assert "<tools>" in house and f" Assistant: {call}" in house
    assert " Human: <tool_response>\n18 and sunny\n</tool_response> Assistant:" in house


@pytest.mark.parametrize("style", ["house", "hermes", "llama3"])
def test_required_and_named_calls_always_follow_the_schema(
    engines: dict[str, ChatGenerator], style: str
) -> None:
    engine = engines[style]
    parallel = False  # (an untrained model under the parallel grammar may call on to max_tokens: below)
    for seed in range(3):
        for choice in ("required", {"type": "function", "function": {"name": "get_time"}}):
            done = engine.generate(
                ASK,
                SamplingParams(temperature=1.0, seed=seed, n=2, max_new_tokens=120),
                tools=TOOLS,
                tool_choice=choice,
                parallel_tool_calls=parallel,
            )
            for c in done.choices:
                assert c.finish_reason == "tool_calls", (style, c.text)
                assert c.tool_calls and (parallel or len(c.tool_calls) == 1)
                for call in c.tool_calls:
                    if choice != "required":
                        assert call.name == "get_time"
                    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
                    assert call.id.startswith("call_")
                assert c.text == ""  # a call alone: no text


def test_parallel_calls_each_follow_the_schema(engines: dict[str, ChatGenerator]) -> None:
    for seed in range(4):
        one = engine_call(engines["house"], seed, parallel=False)
        assert len(one.tool_calls) == 1  # type: ignore[attr-defined]
        many = engine_call(engines["hermes"], seed, parallel=True)
        # an untrained model may go on calling until max_tokens: every call it finished is valid
        assert many.finish_reason in ("tool_calls", "length"), many  # type: ignore[attr-defined]
        for call in many.tool_calls:  # type: ignore[attr-defined]
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def engine_call(engine: ChatGenerator, seed: int, *, parallel: bool) -> object:
    return engine.generate(
        ASK,
        SamplingParams(temperature=1.0, seed=seed, max_new_tokens=120),
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=parallel,
    ).choices[0]


def test_auto_and_none(engines: dict[str, ChatGenerator]) -> None:
    engine = engines["house"]
    # the untrained model answers in text under auto: no calls, the text streamed whole
    params = SamplingParams(temperature=0, max_new_tokens=30)
    auto = engine.generate(LOOP, params, tools=TOOLS)
    assert auto.choices[0].finish_reason in ("stop", "length") and auto.choices[0].tool_calls == []
    streamed = engine.submit(LOOP, params, tools=TOOLS)
    assert "".join(d.text for d in streamed) == auto.choices[0].text
    # none hides the tools: the prompt is the conversation alone
    none = engine.submit(ASK, params, tools=TOOLS, tool_choice="none")
    assert none.prompt_ids == engine.prompt_ids(ASK)
    none.result()
    shown = engine.submit(ASK, params, tools=TOOLS)
    assert len(shown.prompt_ids) > len(none.prompt_ids)
    shown.result()


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        ([WEATHER, WEATHER], "auto", "tools[1].function.name"),
        ([{"type": "retrieval"}], "auto", "tools[0].type"),
        ([{"type": "function", "function": {"name": "bad name"}}], "auto", "tools[0].function.name"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nope"}}}],
            "auto",
            "tools[0].function.parameters",
        ),
        (TOOLS, {"type": "function", "function": {"name": "absent"}}, "tool_choice"),
        (TOOLS, 7, "tool_choice"),
    ],
)
def test_bad_tools_name_the_field(
    engines: dict[str, ChatGenerator], tools: list[dict], choice: object, param: str
) -> None:
    with pytest.raises(ChatRequestError) as e:
        engines["house"].submit(ASK, SamplingParams(max_new_tokens=2), tools=tools, tool_choice=choice)
    assert e.value.param == param, e.value


def test_a_call_and_a_schema_together_are_refused(engines: dict[str, ChatGenerator]) -> None:
    from rlhf_engine.chat.structured import grammar_of

    grammar = grammar_of({"type": "json_object"})
    with pytest.raises(ChatRequestError) as e:
        engines["house"].submit(
            ASK, SamplingParams(max_new_tokens=2, grammar=grammar), tools=TOOLS, tool_choice="required"
        )
    assert e.value.param == "response_format"


def test_the_reader_holds_back_a_call_and_shows_the_text_around_it() -> None:
    names = {"get_weather"}
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    reply = f"Let me look.\n{call}"
    for size in (1, 3, 7, len(reply)):
        reader = Reader("house", names)
        shown = "".join(reader.push(reply[i : i + size]) for i in range(0, len(reply), size))
        rest, calls = reader.finish()
        assert shown + rest == "Let me look.\n" and [c.name for c in calls] == ["get_weather"]
        assert json.loads(calls[0].arguments) == {"city": "Oslo", "unit": "c"}
    # text that only looks like the start of a call is shown in the end
    reader = Reader("house", names)
    shown = reader.push("a <tool") + reader.push("box> b")
    assert shown + reader.finish()[0] == "a <toolbox> b"
    # a call to an unknown tool, or arguments that are not JSON, leave the reply as text
    for bad in (
        '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>',
        "<tool_call>\n{oops\n</tool_call>",
    ):
        assert parse(bad, "house", names) == (bad, [])
    # Llama 3: the reply is the JSON object
    text, calls = parse(
        '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "f"}}', "llama3", names
    )
    assert text is None and json.loads(calls[0].arguments) == {"city": "Rome", "unit": "f"}
