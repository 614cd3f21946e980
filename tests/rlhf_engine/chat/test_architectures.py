"""The chat generator on every architecture of the tiny kit: requests batched together (continuous
batching) give the tokens plain `generate` gives each alone, on the transformers and the
DeepSpeed-Inference backends — also when their prompts start from cached keys/values of earlier
prompts (the template's start, a whole earlier prompt), which every architecture without
sliding-window layers reuses."""

from __future__ import annotations

import pytest
import torch

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.models.tiny import ARCHS, build_tiny
from rlhf_engine.runtime.prefix import has_sliding_layers

NEW = 72  # past the sliding window (64) of mistral and gemma3: their windowed layers matter
QUESTIONS = ["What is a dog?", "Tell me about the kite.", "Where does the owl live?"]
LATER = [
    *QUESTIONS,
    "Why is the sky blue?",
]  # the same prompts again, and a new one: starts taken from the cache


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_greedy_replies_equal_generate_on_both_backends(arch: str) -> None:
    from transformers import AutoModelForCausalLM

    path = str(build_tiny(arch, "xs", pretrain_steps=0))  # type: ignore[arg-type]
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)
    refs: dict[str, list[int]] = {}
    for backend in ("transformers", "deepspeed"):
        with ChatGenerator.load(path, backend=backend) as engine:
            for n, round_ in enumerate((QUESTIONS, LATER)):
                handles = [
                    engine.submit([{"role": "user", "content": q}], params) for q in round_
                ]  # all at once
                for q, handle in zip(round_, handles, strict=True):
                    if q not in refs:
                        ids = torch.tensor([engine.prompt_ids([{"role": "user", "content": q}])])
                        with torch.no_grad():
                            ref = hf.generate(
                                ids,
                                attention_mask=torch.ones_like(ids),
                                do_sample=False,
                                max_new_tokens=NEW,
                                min_new_tokens=NEW,
                                pad_token_id=engine.tokenizer.pad_token_id,
                            )
                        refs[q] = ref[0, ids.shape[1] :].tolist()
                    assert handle.result().choices[0].token_ids == refs[q], (backend, n, q)
            stats = engine.prompt_cache
            if has_sliding_layers(hf.config):
                assert stats["reused_tokens"] == 0
            else:  # the second round ran only the last token of the repeated prompts through the model
                assert stats["reused_tokens"] >= sum(
                    len(engine.prompt_ids([{"role": "user", "content": q}])) - 1 for q in QUESTIONS
                ), stats
