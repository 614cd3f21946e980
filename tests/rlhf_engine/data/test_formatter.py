"""The one prompt formatter: DeepSpeed-Chat's layout, chat templates, and training == chat."""

from __future__ import annotations

import copy

from rlhf_engine.data.formatter import encode_answer, encode_prompt, render_answer, render_prompt
from rlhf_engine.data.tokenize import tokenize_rows
from rlhf_engine.data.types import Message, Sample

CONV = (Message("user", "What color is the dog?"),)
MULTI = (
    Message("system", "Be kind."),
    Message("user", "Hi"),
    Message("assistant", "Hello."),
    Message("user", "What color is the dog?"),
)

CHATML = (
    "{% for m in messages %}<|im|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im|>assistant\n{% endif %}"
)


def test_deepspeed_chat_layout_without_template() -> None:
    assert render_prompt(CONV) == " Human: What color is the dog? Assistant:"
    assert render_answer(CONV, "The dog is red.") == " The dog is red."
    assert (
        render_prompt(MULTI)
        == "Be kind. Human: Hi Assistant: Hello. Human: What color is the dog? Assistant:"
    )


def test_bundled_template_renders_like_deepspeed_chat(tokenizer) -> None:
    assert tokenizer.chat_template  # the template path is the one taken
    for conv in (CONV, MULTI):
        assert render_prompt(conv, tokenizer) == render_prompt(conv, None)
        assert render_answer(conv, "Red.", tokenizer) == render_answer(conv, "Red.", None)


def test_message_dicts_and_objects_render_the_same(tokenizer) -> None:
    as_dicts = [m.as_dict() for m in MULTI]
    assert render_prompt(as_dicts, tokenizer) == render_prompt(MULTI, tokenizer)


def test_a_tokenizers_own_template_is_used(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    assert render_prompt(CONV, tok) == "<|im|>user\nWhat color is the dog?<|end|>\n<|im|>assistant\n"
    # the answer carries the template's end-of-turn marker, and EOS is appended once
    assert render_answer(CONV, "Red.", tok) == "Red.<|end|>\n"
    ids = encode_answer(CONV, "Red.", tok)
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


def test_training_and_chat_tokenise_a_prompt_identically(tokenizer) -> None:
    """Step 1's prompt tokens are exactly the tokens the chat generator will feed for the same text."""
    chat_ids = encode_prompt([{"role": "user", "content": "What color is the dog?"}], tokenizer)
    rows, _ = tokenize_rows(
        1, [Sample(CONV, "The dog is red.")], tokenizer, max_seq_len=512, max_prompt_len=256
    )
    ids, prompt_len, spans = rows[0]
    assert spans == []  # one turn: only the final answer trains
    assert ids[:prompt_len] == chat_ids
    assert ids[prompt_len:] == encode_answer(CONV, "The dog is red.", tokenizer)
    assert ids[-1] == tokenizer.eos_token_id
    step3, _ = tokenize_rows(3, [Sample(CONV, "x")], tokenizer, max_seq_len=512, max_prompt_len=256)
    assert step3[0][0] == chat_ids
