"""The bundled byte-level BPE: deterministic, lossless on any Unicode, loadable by transformers 4 and 5."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_engine.data.formatter import DS_CHAT_TEMPLATE
from rlhf_engine.models.tokenizer import EOS, PAD, _bundled_texts, train_bpe


def test_training_is_deterministic() -> None:
    texts = list(_bundled_texts())
    assert train_bpe(texts).to_str() == train_bpe(texts).to_str()


def test_saved_fields_load_in_transformers_4_and_5(tokenizer_dir: Path) -> None:
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    # transformers 4.x refuses 5.x's "TokenizersBackend" and older 4.x ignore chat_template.jinja
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == DS_CHAT_TEMPLATE
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == (EOS, PAD, EOS)
    assert {v["content"] for v in config["added_tokens_decoder"].values()} == {EOS, PAD}
    assert not (tokenizer_dir / "chat_template.jinja").exists()
    assert "TokenizersBackend" not in "".join(p.read_text() for p in tokenizer_dir.glob("*.json"))
    for tok in (
        AutoTokenizer.from_pretrained(str(tokenizer_dir)),
        PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir)),
    ):
        assert tok.eos_token == EOS and tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
        assert tok.chat_template == DS_CHAT_TEMPLATE


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_unicode_round_trips_without_unknown_tokens(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < len(tokenizer) for i in ids)


def test_fixed_unicode_examples(tokenizer) -> None:
    for text in (
        "héllo wörld",
        "日本語のテキスト",
        "emoji 🙂🚀 and \u200b zero-width",
        "tab\tnew\nline\r\n",
        "\x00",
    ):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
