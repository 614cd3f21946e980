"""LoRA adapters served on a shared base: rows of different adapters (and of the bare base) decoded in one
continuous batch give, each, the tokens the merged model's own `generate` gives — on every architecture
of the tiny kit."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.chat.errors import ModelLoadError
from rlhf_engine.models.tiny import ARCHS, build_tiny
from tests.helpers.adapters import greedy, make_adapter

NEW = 24
QUESTIONS = ["What is a dog?", "Tell me about the kite.", "Where does the owl live?"]


def user(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_of_adapters_equals_each_merged_model(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = build_tiny(arch, "xs", pretrain_steps=0)  # type: ignore[arg-type]
    merged = {
        "a": make_adapter(base, tmp_path / "a", seed=1, rank=4, scale=3.0),
        # another rank, attention only: a layer one adapter leaves alone
        "b": make_adapter(base, tmp_path / "b", seed=2, rank=8, targets=_attention(arch), scale=3.0),
    }
    plain = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)
    with ChatGenerator.load(str(base), backend="transformers") as engine:
        for name in merged:
            engine.load_adapter(name, tmp_path / name)
        jobs: list[tuple[str, str | None]] = [(q, k) for q in QUESTIONS for k in ("a", "b", None)]
        handles = [engine.submit(user(q), params, adapter=key) for q, key in jobs]  # one batch
        differs = 0
        for (q, key), handle in zip(jobs, handles, strict=True):
            prompt = engine.prompt_ids(user(q))
            want = greedy(merged[key] if key else plain, prompt, NEW)
            got = handle.result().choices[0].token_ids
            assert got == want, (arch, q, key)
            differs += key is not None and want != greedy(plain, prompt, NEW)
        assert differs >= 3, "the adapters must change the replies, or this test proves nothing"
        assert engine.adapters.plan is None
        assert all(a.pins == 0 for a in engine.adapters.adapters.values())


def _attention(arch: str) -> list[str]:
    return {
        "opt": ["q_proj", "v_proj"],
        "gpt2": ["c_attn"],
        "gpt_neox": ["query_key_value"],
        "phi3": ["qkv_proj"],
    }.get(arch, ["q_proj", "k_proj", "v_proj", "o_proj"])


@pytest.fixture(scope="module")
def llama() -> Path:
    return build_tiny("llama", "xs", pretrain_steps=0)


def test_prompt_cache_is_kept_per_adapter_and_lru_budget_spares_adapters_in_use(
    llama: Path, tmp_path: Path
) -> None:
    merged = {k: make_adapter(llama, tmp_path / k, seed=i, scale=3.0) for i, k in enumerate("abc")}
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    with ChatGenerator.load(str(llama), backend="transformers") as engine:
        engine.load_adapter("a", tmp_path / "a")
        one = engine.adapters.bytes
        engine.adapters.budget = 2 * one  # room for two
        prompt = engine.prompt_ids(user(QUESTIONS[0]))
        # the same prompt under the base, then under adapter a: a's keys/values are not the base's
        assert engine.generate(user(QUESTIONS[0]), params).choices[0].token_ids == greedy(
            AutoModel(llama), prompt, 8
        )
        got = engine.generate(user(QUESTIONS[0]), params, adapter="a").choices[0].token_ids
        assert got == greedy(merged["a"], prompt, 8)
        # a request holds a; loading b then c evicts b (least recently used and idle), never a
        held = engine.submit(
            user(QUESTIONS[1]), SamplingParams(temperature=0, max_new_tokens=400), adapter="a"
        )
        engine.load_adapter("b", tmp_path / "b")
        engine.adapters.adapters.move_to_end("a", last=False)  # a is now the least recently used
        engine.load_adapter("c", tmp_path / "c")
        assert set(engine.adapters.resident()) == {"a", "c"}
        held.cancel()
        held.result()
        with pytest.raises(ModelLoadError, match="not loaded"):
            engine.submit(user(QUESTIONS[0]), params, adapter="b")
        assert all(a.pins == 0 for a in engine.adapters.adapters.values())


def AutoModel(path: Path) -> object:  # noqa: N802
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_adapter_for_another_base_is_refused_naming_the_file(llama: Path, tmp_path: Path) -> None:
    other = build_tiny("opt", "xs", pretrain_steps=0)
    make_adapter(other, tmp_path / "opt", seed=0)
    with ChatGenerator.load(str(llama), backend="transformers") as engine:
        with pytest.raises(ModelLoadError, match="adapter_model.safetensors"):
            engine.load_adapter("x", tmp_path / "opt")
        assert engine.adapters.resident() == []
        # nothing was wrapped or kept: the base still answers
        assert (
            engine.generate(
                user("hi"), SamplingParams(max_new_tokens=2, ignore_eos=True)
            ).usage.completion_tokens
            == 2
        )


def test_an_adapter_with_ranks_per_layer_beside_base_rows(llama: Path, tmp_path: Path) -> None:
    """PEFT's rank_pattern: q_proj at rank 2, the rest at 6 — padded to one width where rows of the base
    share the batch."""
    merged = make_adapter(llama, tmp_path / "p", seed=5, rank=6, scale=3.0, rank_pattern={"q_proj": 2})
    params = SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True)
    with ChatGenerator.load(str(llama), backend="transformers") as engine:
        engine.load_adapter("p", tmp_path / "p")
        jobs: list[tuple[str, str | None]] = [(q, k) for q in QUESTIONS[:2] for k in ("p", None)]
        handles = [engine.submit(user(q), params, adapter=k) for q, k in jobs]
        for (q, k), handle in zip(jobs, handles, strict=True):
            want = greedy(merged if k else AutoModel(llama), engine.prompt_ids(user(q)), NEW)
            assert handle.result().choices[0].token_ids == want, (q, k)


def test_an_adapter_with_values_that_are_not_finite_is_refused(llama: Path, tmp_path: Path) -> None:
    """NaN × 0 is NaN: such an adapter in a shared batch would poison every other row, so it never loads."""
    from safetensors.torch import load_file, save_file

    make_adapter(llama, tmp_path / "inf", seed=6)
    weights = tmp_path / "inf" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(weights))
    with ChatGenerator.load(str(llama), backend="transformers") as engine:
        with pytest.raises(ModelLoadError, match="not finite"):
            engine.load_adapter("inf", tmp_path / "inf")
        assert engine.adapters.resident() == []
