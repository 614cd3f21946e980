"""Structured outputs in the chat generator (rlhf_engine/chat/structured.py): every reply under a JSON
schema follows it — 200 replies of a model with random weights to a nested schema (enums, arrays,
required fields, a nested object), all valid — while plain requests in the same continuous batch are
untouched; a seed gives the same structured reply; the real SmolLM2 tokenizer (49k tokens, byte
fallback) is constrained as well; schemas the engine cannot compile are refused naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.chat.errors import ChatRequestError
from rlhf_engine.chat.structured import grammar_of

PET: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["dog", "cat", "owl"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "toys": {"type": "array", "items": {"enum": ["ball", "kite", "book"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "garden": {"type": "boolean"}},
            "required": ["city", "garden"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "toys", "home"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe your pet."}]


def _format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlhf_engine.models.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("random") / "m", "opt", "xs", pretrain_steps=0, seed=11)


@pytest.fixture(scope="module")
def engine(random_model: Path) -> Iterator[ChatGenerator]:
    with ChatGenerator.load(str(random_model), backend="transformers", max_batch_size=64, max_queue=512) as e:
        yield e


def test_two_hundred_replies_of_a_random_model_all_follow_a_nested_schema(engine: ChatGenerator) -> None:
    grammar = grammar_of(_format(PET))
    plain = SamplingParams(max_new_tokens=24, temperature=1.0, seed=99)
    alone = engine.generate(ASK, plain).choices[0].text
    shaped = [
        engine.submit(ASK, SamplingParams(max_new_tokens=160, temperature=1.0, seed=i, grammar=grammar))
        for i in range(200)
    ]
    beside = [engine.submit(ASK, plain) for _ in range(4)]  # plain rows in the same batch
    for handle in shaped:
        reply = handle.result().choices[0]
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.text), PET)
    assert all(h.result().choices[0].text == alone for h in beside)  # untouched by their neighbours' masks


def test_a_seed_gives_the_same_structured_reply_and_greedy_works(engine: ChatGenerator) -> None:
    grammar = grammar_of(_format(PET))
    twice = [
        engine.generate(ASK, SamplingParams(max_new_tokens=160, seed=5, grammar=grammar, n=2))
        for _ in range(2)
    ]
    assert [c.text for c in twice[0].choices] == [c.text for c in twice[1].choices]
    greedy = engine.generate(ASK, SamplingParams(max_new_tokens=160, temperature=0, grammar=grammar))
    jsonschema.validate(json.loads(greedy.choices[0].text), PET)
    anything = engine.generate(
        ASK, SamplingParams(max_new_tokens=160, seed=1, grammar=grammar_of({"type": "json_object"}))
    )
    text, end = anything.choices[0].text, anything.choices[0].finish_reason
    assert text.startswith("{"), text  # an object from the first token, whatever the model would say
    if end == "stop":  # an open object may run to max_new_tokens
        assert isinstance(json.loads(text), dict)


def test_a_real_tokenizer_is_constrained_too(smollm2: Path) -> None:
    grammar = grammar_of(_format(PET))
    with ChatGenerator.load(str(smollm2), backend="transformers") as e:
        handles = [
            e.submit(ASK, SamplingParams(max_new_tokens=120, seed=i, grammar=grammar)) for i in range(3)
        ]
        for h in handles:
            reply = h.result().choices[0]
            assert reply.finish_reason == "stop", reply
            jsonschema.validate(json.loads(reply.text), PET)


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        (_format({"$ref": "#/$defs/missing"}), "response_format.json_schema.schema"),
        (
            _format({"type": "object", "properties": {"a": {"type": "strnig"}}}),
            "response_format.json_schema.schema",
        ),
        ({"type": "json_schema", "json_schema": {"schema": PET}}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}},
            "response_format.json_schema.schema",
        ),
        ({"type": "xml"}, "response_format.type"),
    ],
)
def test_schemas_that_cannot_be_compiled_are_refused_naming_the_field(
    response_format: dict[str, Any], param: str
) -> None:
    with pytest.raises(ChatRequestError) as e:
        grammar_of(response_format)
    assert e.value.param == param, e.value
    assert grammar_of(None) is None and grammar_of({"type": "text"}) is None
