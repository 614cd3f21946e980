"""Streaming detokenisation: deltas never taken back, stop strings cut exactly, characters whole."""

from __future__ import annotations

from typing import Any

import pytest

from rlhf_engine.chat.text import StreamText


def stream(tokenizer: Any, text: str, stop: list[str]) -> tuple[list[str], StreamText]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    st = StreamText(tokenizer, [], stop)
    deltas = []
    for t in ids:
        st.push(t)
        deltas.append(st.take())
        if st.stopped:
            break
    st.flush()
    deltas.append(st.take(final=True))
    return deltas, st


def test_deltas_join_to_the_decoded_text(tokenizer: Any) -> None:
    text = "The dog runs to the big red barn. It is happy!"
    deltas, st = stream(tokenizer, text, [])
    assert "".join(deltas) == st.text == text
    assert sum(1 for d in deltas if d) > 5  # incremental, not one lump at the end


def test_stop_string_ends_the_text_before_it(tokenizer: Any) -> None:
    deltas, st = stream(tokenizer, "The dog runs. The cat sleeps.", ["cat"])
    assert st.stopped
    assert "".join(deltas) == "The dog runs. The "


def test_text_that_may_start_a_stop_string_is_held_back_then_released(tokenizer: Any) -> None:
    # "ba" could begin the stop string "barn!"; once "bark" shows it does not, it is released
    ids = tokenizer("the dog can bark", add_special_tokens=False)["input_ids"]
    st = StreamText(tokenizer, [], ["barn!"])
    seen = ""
    for t in ids:
        st.push(t)
        seen += st.take()
        assert not seen.endswith("b"), "a possible stop-string start was handed out"
    st.flush()
    seen += st.take(final=True)
    assert seen == "the dog can bark" and not st.stopped


def test_stop_string_spanning_many_tokens(tokenizer: Any) -> None:
    deltas, st = stream(tokenizer, "one two three four five", ["three four"])
    assert "".join(deltas) == "one two " and st.stopped


@pytest.mark.parametrize("text", ["naïve café 😀 done", "日本語のテキスト"])
def test_multibyte_characters_are_never_split(tokenizer: Any, text: str) -> None:
    deltas, st = stream(tokenizer, text, [])
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
