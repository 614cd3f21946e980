"""Out-of-range request parameters are refused with a message naming the field."""

from __future__ import annotations

import pytest

from rlhf_engine.chat.errors import ChatRequestError, ContextLengthExceededError
from rlhf_engine.config.chat import ChatGeneratorConfig, ChatLimits, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"n": 0}, "n"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"n": True}, "n"),
    ],
)
def test_bad_sampling_params(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(ChatRequestError) as e:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert e.value.param == param
    assert str(e.value).startswith(f"{param}:")


def test_a_single_stop_string_is_accepted() -> None:
    assert SamplingParams(stop="\n").stop == ["\n"]  # type: ignore[arg-type]


def test_server_limits_and_the_context_length() -> None:
    limits = ChatLimits(max_new_tokens_limit=100, default_max_new_tokens=50, max_n=2, max_stop=2)
    assert limits.check(SamplingParams(), prompt_tokens=10, context_len=512) == 50
    assert limits.check(SamplingParams(), prompt_tokens=490, context_len=512) == 22  # default shrinks to fit
    assert limits.check(SamplingParams(max_new_tokens=100), prompt_tokens=10, context_len=512) == 100
    with pytest.raises(ChatRequestError, match="max_new_tokens: 101 is above this server's limit of 100"):
        limits.check(SamplingParams(max_new_tokens=101), prompt_tokens=10, context_len=512)
    with pytest.raises(ChatRequestError, match="n: 3 is above"):
        limits.check(SamplingParams(n=3), prompt_tokens=10, context_len=512)
    with pytest.raises(ChatRequestError, match="stop: 3 strings"):
        limits.check(SamplingParams(stop=["a", "b", "c"]), prompt_tokens=10, context_len=512)
    with pytest.raises(ContextLengthExceededError, match="at most 12 new tokens fit") as e:
        limits.check(SamplingParams(max_new_tokens=20), prompt_tokens=500, context_len=512)
    assert e.value.param == "max_new_tokens"
    with pytest.raises(ContextLengthExceededError, match="shorten the conversation") as e:
        limits.check(SamplingParams(), prompt_tokens=512, context_len=512)
    assert e.value.param == "messages"


def test_engine_config_refuses_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="max_n 8 must not exceed max_batch_size 4"):
        ChatGeneratorConfig(max_batch_size=4)
    with pytest.raises(ValueError, match="kernel_inject needs backend deepspeed"):
        ChatGeneratorConfig(backend="transformers", kernel_inject=True)
