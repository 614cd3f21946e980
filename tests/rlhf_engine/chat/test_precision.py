"""Lower-precision decoding: bf16 and weight-only int8 (torchao) load, decode and stay close to fp32 on
the pretrained tiny model; int8 on a backend it cannot run on is refused naming `dtype`. (Quality on a real
checkpoint — greedy agreement over 200 prompts, perplexity — is bench/precision.py's.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.chat.errors import ModelLoadError

QUESTIONS = ["What is a dog?", "Tell me about the kite.", "Where does the owl live?"]
GREEDY = SamplingParams(temperature=0, max_new_tokens=12, logprobs=True)


def user(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def fp32(base_model: Path) -> Iterator[ChatGenerator]:
    with ChatGenerator.load(str(base_model), backend="transformers", dtype="fp32") as e:
        yield e


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_lower_precision_decodes_close_to_fp32(dtype: str, base_model: Path, fp32: ChatGenerator) -> None:
    with ChatGenerator.load(str(base_model), backend="transformers", dtype=dtype) as engine:
        linear = [m for m in engine.loaded.module.modules() if isinstance(m, torch.nn.Linear)]
        if dtype == "int8":  # every linear layer holds int8 weights with per-channel scales
            assert linear and all(type(m.weight).__name__ == "Int8Tensor" for m in linear)
        else:
            assert all(m.weight.dtype == torch.bfloat16 for m in linear)
        for q in QUESTIONS:
            ref = fp32.generate(user(q), GREEDY).choices[0]
            got = engine.generate(user(q), GREEDY).choices[0]
            assert got.text.strip()
            # the first token is chosen from the same prompt: its log-probability under each precision
            first = got.logprobs[0]
            assert first.token == ref.logprobs[0].token, (dtype, q)
            assert abs(first.logprob - ref.logprobs[0].logprob) < 0.05, (dtype, q, first, ref.logprobs[0])


def test_int8_needs_the_transformers_backend(base_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype: int8") as e:
        ChatGenerator.load(str(base_model), backend="deepspeed", dtype="int8")
    assert e.value.param == "dtype"
