"""The one prompt formatter (docs/contracts.md §2).

Training (all three steps), the chat generator and serving render conversations only through these
functions, so a model sees at chat time exactly the text layout it was trained on. With a tokenizer
that has a chat template, the template renders; without one, DeepSpeed-Chat's own layout:
`" Human: {question} Assistant:"` followed by `" {answer}"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhf_engine.data.tools import canonical, house_messages, style_of, template_messages
from rlhf_engine.data.types import Message

# DeepSpeed-Chat's layout as a Jinja chat template; the bundled tiny tokenizers carry it, so the
# template path and the fallback path render identically for them.
DS_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}{{ ' Human: ' + m['content'] }}"
    "{%- else -%}{{ ' Assistant: ' + m['content'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' Assistant:' }}{%- endif -%}"
)

Conversation = Sequence[Message] | Sequence[dict[str, Any]]
Tools = Sequence[dict[str, Any]] | None  # OpenAI tools ({type: function, function: {...}}) or functions


def _dicts(conversation: Conversation) -> list[dict[str, Any]]:
    out = []
    for m in conversation:
        d = m.as_dict() if isinstance(m, Message) else {"role": m["role"], "content": m.get("content") or ""}
        if not isinstance(m, Message):
            if m.get("tool_calls"):
                d["tool_calls"] = list(m["tool_calls"])
            if m.get("tool_call_id"):
                d["tool_call_id"] = m["tool_call_id"]
        out.append(d)
    return out


def _has_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _ds_chat(messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        elif m["role"] == "user":
            parts.append(f" Human: {m['content']}")
        else:
            parts.append(f" Assistant: {m['content']}")
    if add_generation_prompt:
        parts.append(" Assistant:")
    return "".join(parts)


def _render(
    messages: list[dict[str, Any]], tokenizer: Any, *, add_generation_prompt: bool, tools: Tools = None
) -> str:
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        functions = [canonical(t) for t in tools or ()]
        if _has_template(tokenizer) and style_of(tokenizer) != "house":  # the template writes tools itself
            text = tokenizer.apply_chat_template(
                template_messages(messages),
                tools=[{"type": "function", "function": f} for f in functions] or None,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            return str(text)
        messages = house_messages(messages, functions)  # the Hermes layout in plain turns
    if _has_template(tokenizer):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return str(text)
    return _ds_chat(messages, add_generation_prompt=add_generation_prompt)


def render_prompt(conversation: Conversation, tokenizer: Any = None, tools: Tools = None) -> str:
    """The model input for a conversation that ends with a user turn (or tool results), ready for the
    answer; `tools` (OpenAI's) are rendered as the template writes them (rlhf_engine/data/tools.py)."""
    return _render(_dicts(conversation), tokenizer, add_generation_prompt=True, tools=tools)


def render_answer(
    conversation: Conversation, answer: str | Message, tokenizer: Any = None, tools: Tools = None
) -> str:
    """The text that follows `render_prompt(conversation)` when the assistant says `answer`.

    Rendered by the same template as the whole turn (so a template's end-of-turn marker is
    included), then cut after the prompt.
    """
    messages = _dicts(conversation)
    prompt = _render(messages, tokenizer, add_generation_prompt=True, tools=tools)
    turn = _dicts([answer])[0] if isinstance(answer, Message) else {"role": "assistant", "content": answer}
    full = _render(messages + [turn], tokenizer, add_generation_prompt=False, tools=tools)
    if not full.startswith(prompt):
        raise ValueError(
            "the tokenizer's chat template renders a conversation differently once an answer is "
            "added, so prompt and answer cannot be split; use a tokenizer whose template appends "
            "the assistant turn after the generation prompt"
        )
    return full[len(prompt) :]


def _specials(tokenizer: Any) -> bool:
    # A chat template writes its own special tokens (BOS included); without one, the tokenizer adds
    # them as it always does (OPT's leading </s>, as DeepSpeed-Chat tokenises).
    return not _has_template(tokenizer)


def encode_prompt(conversation: Conversation, tokenizer: Any, tools: Tools = None) -> list[int]:
    """Token ids of `render_prompt` — the only way any step or the chat generator tokenises a prompt."""
    ids = tokenizer(render_prompt(conversation, tokenizer, tools), add_special_tokens=_specials(tokenizer))
    return list(ids["input_ids"])


def encode_answer(
    conversation: Conversation, answer: str | Message, tokenizer: Any, tools: Tools = None
) -> list[int]:
    """Token ids of `render_answer`, ending with EOS.

    A template whose end-of-turn marker is EOS (ChatML's `<|im_end|>`, as SmolLM2 and Qwen write it)
    is cut right after it: what it writes next (`\n`) is never generated, since generation stops at
    EOS, so SFT must not learn it and a reward model must be trained to score at EOS, where step 3,
    `rlhf eval` and chat read its score. Otherwise EOS is appended.
    """
    text = render_answer(conversation, answer, tokenizer, tools)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is None:
        return ids
    if eos in ids:
        return ids[: len(ids) - ids[::-1].index(eos)]
    return ids + [eos]
