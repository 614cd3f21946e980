"""Log-probabilities and OpenAI's sampling controls (logit_bias, presence/frequency penalties, seed, n),
each held against the same controls written out on plain transformers (tests/reference.py: one full
forward pass per token, no cache, no batch) on the same model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.chat.errors import ChatRequestError
from tests.reference import decode

QUESTIONS = ["What is a dog?", "Tell me about the kite.", "Where does the owl live?"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module", params=["opt", "llama"])
def model_dir(request: pytest.FixtureRequest, base_model: Path) -> Path:
    """The pretrained tiny OPT, and a tiny Llama (rotary positions, grouped-query attention)."""
    from rlhf_engine.models.tiny import build_tiny

    return base_model if request.param == "opt" else build_tiny("llama", "xs")


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[ChatGenerator]:
    with ChatGenerator.load(str(model_dir), backend="transformers") as e:
        yield e


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> object:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def reference(engine: ChatGenerator, hf: object, q: str, max_new: int, **controls: object) -> list[int]:
    tokens, _ = decode(hf, engine.prompt_ids(user(q)), max_new, eos=set(engine.loaded.eos_ids), **controls)  # type: ignore[arg-type]
    return tokens


def test_logprobs_and_top_logprobs_equal_the_models_log_softmax(engine: ChatGenerator, hf: object) -> None:
    for q in QUESTIONS:
        reply = engine.generate(
            user(q), SamplingParams(temperature=0, max_new_tokens=25, logprobs=True, top_logprobs=5)
        ).choices[0]
        tokens, logps = decode(hf, engine.prompt_ids(user(q)), 25, eos=set(engine.loaded.eos_ids))
        assert reply.token_ids == tokens
        assert [lp.token for lp in reply.logprobs] == tokens  # one per token, in order
        for lp, ref in zip(reply.logprobs, logps, strict=True):
            assert isinstance(ref, torch.Tensor)
            assert lp.logprob == pytest.approx(float(ref[lp.token]), abs=1e-4)
            values, ids = torch.topk(ref, 5)
            assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)
            assert [t for t, _ in lp.top] == ids.tolist()
            assert lp.top[0][0] == lp.token  # greedy: the most likely token is the one chosen
    # sampled at a temperature, the log-probabilities are still the model's own (not the tempered ones)
    hot = engine.generate(
        user(QUESTIONS[0]), SamplingParams(temperature=1.7, seed=3, max_new_tokens=15, logprobs=True)
    ).choices[0]
    _, logps = decode(hf, engine.prompt_ids(user(QUESTIONS[0])) + hot.token_ids[:-1], 1, eos=set())
    assert hot.logprobs[-1].logprob == pytest.approx(float(logps[0][hot.token_ids[-1]]), abs=1e-4)  # type: ignore[index]
    assert all(lp.top == [] for lp in hot.logprobs)  # top_logprobs 0: none
    assert all(lp.logprob <= 0 for lp in hot.logprobs)
    # no logprobs asked, none computed
    assert engine.generate(user("Hi"), SamplingParams(max_new_tokens=3, seed=1)).choices[0].logprobs == []


def test_token_bytes_join_to_the_reply(engine: ChatGenerator) -> None:
    reply = engine.generate(
        user(QUESTIONS[1]), SamplingParams(temperature=0, max_new_tokens=30, logprobs=True)
    ).choices[0]
    text_ids = [t for t in reply.token_ids if t not in engine.loaded.eos_ids]
    joined = b"".join(engine.token_bytes(text_ids)).decode()
    assert len(joined) > 10 and joined.strip() == reply.text.strip()
    # a special token's bytes are its text (OpenAI shows "<|endoftext|>" likewise)
    eos = sorted(engine.loaded.eos_ids)[0]
    assert engine.token_bytes([eos]) == [engine.tokenizer.convert_ids_to_tokens(eos).encode()]


def test_logit_bias_equals_the_reference(engine: ChatGenerator, hf: object) -> None:
    q = QUESTIONS[0]
    plain = engine.generate(user(q), SamplingParams(temperature=0, max_new_tokens=20)).choices[0].token_ids
    ban = {plain[0]: -100.0, plain[1]: -100.0}  # the first two greedy tokens banned
    boost = {engine.tokenizer.convert_tokens_to_ids(engine.tokenizer.tokenize(" owl"))[0]: 6.0}
    for bias in (ban, boost, {**ban, **boost}):
        ours = engine.generate(user(q), SamplingParams(temperature=0, max_new_tokens=20, logit_bias=bias))
        ref = reference(engine, hf, q, 20, logit_bias=bias)
        assert ours.choices[0].token_ids == ref
        assert ref != plain  # the bias changed the reply
    banned = engine.generate(user(q), SamplingParams(temperature=0, max_new_tokens=20, logit_bias=ban))
    assert not set(ban) & set(banned.choices[0].token_ids)
    # JSON's string keys, as the API passes them
    assert SamplingParams(logit_bias={"5": 1.0}).logit_bias == {5: 1.0}  # type: ignore[dict-item]
    with pytest.raises(ChatRequestError) as e:
        engine.submit(user(q), SamplingParams(logit_bias={engine.vocab_size: 1.0}))
    assert e.value.param == "logit_bias" and "outside this model's vocabulary" in str(e.value)


def test_presence_and_frequency_penalties_equal_the_reference(engine: ChatGenerator, hf: object) -> None:
    q = QUESTIONS[2]
    plain = engine.generate(user(q), SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True))
    repeats = len(plain.choices[0].token_ids) - len(set(plain.choices[0].token_ids))
    for presence, frequency in ((1.5, 0.0), (0.0, 1.2), (0.8, 0.5), (-1.0, 0.0)):
        params = SamplingParams(
            temperature=0, max_new_tokens=40, presence_penalty=presence, frequency_penalty=frequency
        )
        ours = engine.generate(user(q), params).choices[0].token_ids
        ref = reference(engine, hf, q, 40, presence_penalty=presence, frequency_penalty=frequency)
        assert ours == ref, (presence, frequency)
    penalised = (
        engine.generate(
            user(q), SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True, presence_penalty=2.0)
        )
        .choices[0]
        .token_ids
    )
    assert len(penalised) - len(set(penalised)) < repeats  # fewer repeated tokens than without


def test_seeded_sampling_and_n_equal_the_reference(engine: ChatGenerator, hf: object) -> None:
    q = QUESTIONS[1]
    params = SamplingParams(temperature=0.9, seed=41, n=3, max_new_tokens=20, frequency_penalty=0.3)
    ours = engine.generate(user(q), params)
    assert len(ours.choices) == 3
    for choice in ours.choices:  # reply i samples with seed + i
        ref = reference(engine, hf, q, 20, temperature=0.9, seed=41 + choice.index, frequency_penalty=0.3)
        assert choice.token_ids == ref, choice.index
    assert len({tuple(c.token_ids) for c in ours.choices}) == 3
    # the same seed on the same server: the same tokens, however the batch around it changes
    busy = [engine.submit(user(x), SamplingParams(seed=7, max_new_tokens=30)) for x in QUESTIONS]
    again = engine.generate(user(q), params)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in ours.choices]
    for h in busy:
        h.result()


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(1025)}}, "logit_bias"),
    ],
)
def test_bad_controls_name_the_field(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(ChatRequestError) as e:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert e.value.param == param
