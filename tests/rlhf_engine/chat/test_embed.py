"""Embeddings from a served causal LM (rlhf_engine/chat/embed.py): each vector equals the mean of the
model's last hidden states over that input alone, computed with plain transformers, whatever the batch
and padding around it; they are computed on the engine's thread while chats stream; bad inputs are
refused naming `input[i]`; and on the real SmolLM2 checkpoint a paraphrase is nearer than an unrelated
sentence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.chat.errors import ChatRequestError, ContextLengthExceededError
from tests.reference import mean_pooled

TEXTS = ["The dog is brown.", "A kite", "Where does the owl live? It lives in the forest and likes to sing."]


@pytest.fixture(scope="module")
def engine(base_model: Path) -> Iterator[ChatGenerator]:
    with ChatGenerator.load(str(base_model), backend="transformers") as e:
        yield e


def test_vectors_equal_plain_transformers_mean_pooling_whatever_the_batch(
    engine: ChatGenerator, base_model: Path
) -> None:
    want = mean_pooled(str(base_model), TEXTS)
    together = engine.embed(TEXTS).result(timeout=60)  # one batch, padded to the longest
    alone = [engine.embed([t]).result(timeout=60).vectors[0] for t in TEXTS]
    for got in (together.vectors, alone):
        for v, w in zip(got, want, strict=True):
            assert v == pytest.approx(w, abs=2e-5)
            assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-5)
    tok = engine.tokenizer
    assert together.tokens == [len(tok(t)["input_ids"]) for t in TEXTS]
    ids = tok(TEXTS[0])["input_ids"]  # token ids embed as the text they spell
    assert engine.embed([ids]).result(timeout=60).vectors[0] == pytest.approx(want[0], abs=2e-5)


def test_embeddings_between_decode_steps_leave_running_chats_as_they_were(engine: ChatGenerator) -> None:
    """Embedding on the engine's thread while a seeded chat decodes: the chat's reply is the one it gives
    alone, token for token (its KV cache and batch untouched), and the vectors are those of an idle engine."""
    messages = [{"role": "user", "content": "Tell me about the kite."}]
    params = SamplingParams(max_new_tokens=48, temperature=1.0, seed=3)
    alone = engine.generate(messages, params).choices[0].text
    idle = engine.embed(TEXTS).result(timeout=60).vectors
    chat = engine.submit(messages, params)
    stream = iter(chat)
    first = next(stream)  # the chat is decoding
    got = engine.embed(TEXTS).result(timeout=60)
    text = first.text + "".join(d.text for d in stream)
    assert text == alone
    for v, w in zip(got.vectors, idle, strict=True):
        assert v == pytest.approx(w, abs=1e-6)


@pytest.mark.parametrize(
    ("inputs", "param", "error"),
    [
        ([], "input", ChatRequestError),
        (["fine", ""], "input[1]", ChatRequestError),
        ([[1, 2], []], "input[1]", ChatRequestError),
        ([[1, 10**9]], "input", ChatRequestError),
        (["fine", "dog " * 5000], "input[1]", ContextLengthExceededError),
    ],
)
def test_bad_inputs_are_refused_naming_the_input(
    engine: ChatGenerator, inputs: list[object], param: str, error: type[Exception]
) -> None:
    with pytest.raises(error) as e:
        engine.embed(inputs)  # type: ignore[arg-type]
    assert getattr(e.value, "param", None) == param, e.value


def test_smollm2_embeddings_put_a_paraphrase_nearer_than_an_unrelated_sentence(smollm2: Path) -> None:
    """The real checkpoint (what RLHF_EMBEDDING_MODEL names by default): meaning, not noise."""
    triples = [
        (
            "The cat sat on the mat.",
            "A cat was sitting on the rug.",
            "Interest rates rose again this quarter.",
        ),
        ("How do I bake bread?", "What is a recipe for making bread?", "The train leaves at noon."),
        (
            "He plays the guitar every evening.",
            "Each night he practises guitar.",
            "Penguins live in Antarctica.",
        ),
    ]
    with ChatGenerator.load(str(smollm2), backend="transformers") as e:
        for anchor, near, far in triples:
            a, n, f = e.embed([anchor, near, far]).result(timeout=120).vectors
            cos_near = sum(x * y for x, y in zip(a, n, strict=True))
            cos_far = sum(x * y for x, y in zip(a, f, strict=True))
            assert cos_near > cos_far, (anchor, cos_near, cos_far)
