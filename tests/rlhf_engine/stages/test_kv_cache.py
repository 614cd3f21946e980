"""The reserved KV cache (step 3's generation): the same answers and logits (to float rounding) as
Hugging Face's default cache, for every architecture the kit builds, however far a caller writes past
the reserve."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from rlhf_engine.models.tiny import ARCHS, build_tiny
from rlhf_engine.runtime.generation import cache_kwarg
from rlhf_engine.runtime.kv_cache import ReservedLayer, reserved_cache


def _left_padded(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 1, 0  # one row left-padded by 3, one by 1
    ids[2, :1], mask[2, :1] = 1, 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reserve", [12, 3])  # the whole answer, and far too little (the cache grows)
def test_generation_with_the_reserved_cache_is_identical(arch: str, reserve: int) -> None:
    model = AutoModelForCausalLM.from_pretrained(build_tiny(arch, "xs")).eval()  # type: ignore[arg-type]
    batch = _left_padded(model.config.vocab_size)
    runs = []
    for cache in (None, reserved_cache(model, reserve)):
        torch.manual_seed(0)
        extra = {} if cache is None else {cache_kwarg(model): cache}
        with torch.no_grad():
            runs.append(
                model.generate(
                    **batch,
                    max_new_tokens=12,
                    min_new_tokens=12,
                    do_sample=True,
                    pad_token_id=1,
                    return_dict_in_generate=True,
                    output_logits=True,
                    **extra,
                )
            )
        if cache is not None:
            # full-attention layers are reserved; sliding-window ones (Gemma 3's half) keep HF's class
            kinds = [isinstance(layer, ReservedLayer) for layer in cache.layers]
            assert all(kinds) if arch != "gemma3" else kinds == [False, True]
            assert cache.get_seq_length() == 7 + 12 - 1  # the last token is sampled, never fed back
        elif arch == "mistral":
            assert reserved_cache(model, reserve) is None  # every layer slides: generate's own cache
    default, reserved = runs
    assert torch.equal(default.sequences, reserved.sequences)
    # bit for bit in 450 of 450 stress runs; once, under load, a logit differed in its last bits
    assert all(
        torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(default.logits, reserved.logits, strict=True)
    )


def test_a_reserved_layer_crops_and_selects_rows_like_the_default() -> None:
    keys = torch.randn(3, 2, 5, 4)
    values = torch.randn(3, 2, 5, 4)
    step = (torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    default, reserved = DynamicLayer(), ReservedLayer(reserve=2)
    for layer in (default, reserved):
        layer.update(keys, values)
        layer.update(*step)
        layer.crop(-2)  # speculative decoding drops rejected tokens
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.update(*(t[:2] for t in step))  # and writing goes on after either
    assert reserved.get_seq_length() == default.get_seq_length() == 5
    assert reserved.keys is not None and default.keys is not None
    assert reserved.values is not None and default.values is not None
    assert torch.equal(reserved.keys, default.keys) and torch.equal(reserved.values, default.values)


def test_layers_of_another_kind_keep_hugging_faces_cache() -> None:
    config = MistralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    model = MistralForCausalLM(config)
    assert all(type(layer) is DynamicSlidingWindowLayer for layer in DynamicCache(config=config).layers)
    assert reserved_cache(model, reserve=8) is None  # no plain layer to replace: generate builds its own
