r"""Readers: any supported file or directory → a `Dataset` of conversations with chosen/rejected answers.

Row shapes (detected from the first record, then required of every record):

| shape                  | fields                                                             | kind       |
|------------------------|--------------------------------------------------------------------|------------|
| openai_preference      | input.messages, preferred_output, non_preferred_output             | preference |
| openai_chat            | messages (the last one is the assistant's answer)                  | sft        |
| rm_static              | prompt, response, chosen, rejected (Dahoas/rm-static)              | preference |
| prompt_chosen_rejected | prompt, chosen, rejected                                           | preference |
| hh_rlhf                | chosen, rejected: whole "\n\nHuman: …\n\nAssistant: …" transcripts | preference |
| sft_pair               | prompt, response (or completion)                                   | sft        |
| openai_prompt          | messages ending with the user's turn (OpenAI reinforcement)        | prompt     |
| prompt_only            | prompt (and no answer field)                                       | prompt     |
| text                   | text                                                               | text       |

A row's other fields (e.g. `reference_answer` beside `messages`) are kept as the sample's `item`:
what a grader's `{{item.<field>}}` reads in step 3. Prompt-only rows feed step 3 alone.

Files: `.jsonl`, `.json` (JSON Lines or one array), `.txt` (paragraphs), each optionally gzipped, and
directories written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk`. A prompt given
as a string that contains "Human:"/"Assistant:" turns is parsed into a multi-turn conversation.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rlhf_engine.data.bundled import BUNDLED, bundled_path
from rlhf_engine.data.errors import DataError
from rlhf_engine.data.io import ReadLimits, fingerprint, iter_json_records, iter_paragraphs
from rlhf_engine.data.types import Dataset, Kind, Message, Sample

_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# HH-RLHF separates turns with "\n\nHuman:" / "\n\nAssistant:" and real answers contain "Human:"
# ("…\n\nAssistant: Human: No, you are…"): when a transcript uses that separator, only it splits;
# DeepSpeed-Chat's " Human: … Assistant:" layout (no blank lines) splits on the words anywhere
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_SEPARATOR = re.compile(r"\n\n(Human|Assistant):")
_TURN = re.compile(r"(?:^|\n| )(Human|Assistant):")


class _Row:
    """One record plus where it came from, with field access that raises a located DataError."""

    def __init__(self, record: Any, path: str, line: int) -> None:
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, line=line)
        self.record = record
        self.path = path
        self.line = line

    def error(self, field: str, message: str) -> DataError:
        return DataError(message, path=self.path, line=self.line, field=field)

    def text(self, field: str, *, allow_empty: bool = False) -> str:
        if field not in self.record or self.record[field] is None:
            raise self.error(field, "missing; every row must have the fields of the first row")
        value = self.record[field]
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(field, "is empty")
        return value

    def get(self, field: str) -> Any:
        if field not in self.record:
            raise self.error(field, "missing; every row must have the fields of the first row")
        return self.record[field]


# ---------------------------------------------------------------------------- conversation parsing


def parse_transcript(text: str) -> list[Message]:
    """ "\\n\\nHuman: q\\n\\nAssistant: a…" (HH-RLHF) or " Human: q Assistant: a" → messages."""
    parts = (_HH_TURN if _HH_SEPARATOR.search(text) else _TURN).split(text)
    messages: list[Message] = []
    if parts[0].strip():
        messages.append(Message("system", parts[0].strip()))
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append(Message("user" if role == "Human" else "assistant", content.strip()))
    return messages


def _has_turns(text: str) -> bool:
    return bool(re.match(r"\s*(Human|Assistant):", text))


def _prompt_conversation(row: _Row, field: str) -> tuple[Message, ...]:
    """A prompt string → conversation: a transcript if it carries turns, else one user message."""
    text = row.text(field)
    if not _has_turns(text):
        return (Message("user", text.strip()),)
    messages = parse_transcript(text)
    if messages and messages[-1].role == "assistant" and not messages[-1].content:
        messages = messages[:-1]  # "…\n\nAssistant:" — the generation prompt itself
    if not messages or messages[-1].role != "user":
        raise row.error(field, "a transcript prompt must end with a Human turn (then 'Assistant:')")
    return tuple(messages)


def _content(row: _Row, field: str, value: Any) -> str:
    """OpenAI message content: a string or a list of {"type": "text", "text": …} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value if p.get("type") in ("text", "input_text", "output_text")]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "".join(str(t) for t in texts)
    raise row.error(field, "content must be a string or a list of text parts (images are not supported)")


TOOLS_ONLY_SFT = (
    "tool calls train in supervised rows (OpenAI's chat format with tools); leave them out of this file, or "
    "let max_bad_rows skip such rows"
)
LEGACY_FUNCTIONS = "the legacy functions/function_call fields are not supported; give tools and tool_calls"


def _messages(row: _Row, field: str, value: Any, *, tools: bool | None = None) -> list[Message]:
    """A row's messages; tool calls and results only in a supervised chat row (`tools` not None) that
    lists its tools (`tools` True)."""
    if not isinstance(value, list) or not value:
        raise row.error(field, "must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(m, dict) and m.get("function_call"):
            raise row.error(f"{where}.function_call", LEGACY_FUNCTIONS)
        if isinstance(m, dict) and not tools and (m.get("tool_calls") or m.get("role") == "tool"):
            raise row.error(
                where,
                TOOLS_ONLY_SFT
                if tools is None
                else "tool calls and results need the row's 'tools' (the functions it may call)",
            )
        if isinstance(m, dict) and m.get("role") == "tool":
            call = m.get("tool_call_id")
            if not isinstance(call, str) or not call:
                raise row.error(f"{where}.tool_call_id", "a tool message names the call it answers")
            out.append(
                Message("tool", _content(row, f"{where}.content", m.get("content")), tool_call_id=call)
            )
            continue
        if isinstance(m, dict) and m.get("tool_calls"):
            if m.get("role") != "assistant":
                raise row.error(f"{where}.tool_calls", "only assistant messages call tools")
            calls = _tool_calls(row, f"{where}.tool_calls", m["tool_calls"])
            text = m.get("content")
            content = "" if text is None else _content(row, f"{where}.content", text)
            out.append(Message("assistant", content, tool_calls=calls))
            continue
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise row.error(where, "each message needs 'role' and 'content'")
        role = _ROLE_ALIASES.get(m["role"])
        if role is None:
            raise row.error(
                f"{where}.role", f"role {m['role']!r} is not supported; use system, user or assistant"
            )
        out.append(Message(role, _content(row, f"{where}.content", m["content"])))  # type: ignore[arg-type]
    return out


def _tool_calls(row: _Row, field: str, value: Any) -> tuple[tuple[str, str, str], ...]:
    """An assistant message's `tool_calls`, checked as chat checks them."""
    from rlhf_engine.chat.errors import ChatRequestError
    from rlhf_engine.data.tools import calls_of

    try:
        calls = calls_of(value, field)
    except ChatRequestError as e:
        raise row.error(e.param or field, e.message.split(": ", 1)[-1]) from None
    return tuple((c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls)


def _row_tools(row: _Row) -> tuple[dict[str, Any], ...]:
    """A row's `tools`, checked as chat checks them (names, schemas)."""
    from rlhf_engine.chat.errors import ChatRequestError
    from rlhf_engine.data.tools import check

    tools = row.get("tools")
    if not isinstance(tools, list) or not tools:
        raise row.error("tools", "must be a non-empty list of {type: function, function: {name, parameters}}")
    try:
        check(tools)
    except ChatRequestError as e:
        raise row.error(e.param or "tools", e.message.split(": ", 1)[-1]) from None
    return tuple(tools)


def _answer(row: _Row, field: str) -> str:
    """An OpenAI preference output: a list holding one assistant message."""
    msgs = _messages(row, field, row.get(field))
    if len(msgs) != 1 or msgs[0].role != "assistant":
        raise row.error(field, "must hold exactly one assistant message")
    return msgs[0].content


def _check_prompt(
    row: _Row, field: str, conversation: list[Message] | tuple[Message, ...]
) -> tuple[Message, ...]:
    if not conversation or conversation[-1].role not in ("user", "tool"):
        raise row.error(
            field, "the conversation before the answer must end with a user message (or tool results)"
        )
    return tuple(conversation)


# ---------------------------------------------------------------------------- row shapes


def _openai_preference(row: _Row) -> Sample:
    inp = row.get("input")
    if not isinstance(inp, dict) or "messages" not in inp:
        raise row.error("input.messages", "missing; 'input' must be {\"messages\": [...]}")
    conv = _check_prompt(row, "input.messages", _messages(row, "input.messages", inp["messages"]))
    return Sample(conv, _answer(row, "preferred_output"), _answer(row, "non_preferred_output"), row.line)


def _weights(row: _Row, value: list[Any]) -> list[int]:
    """OpenAI's per-message `weight` (assistant messages only: 1 trains it, the default; 0 does not)."""
    out = []
    for i, m in enumerate(value):
        w = m.get("weight", 1)
        if "weight" in m and m.get("role") != "assistant":
            raise row.error(f"messages[{i}].weight", "only assistant messages carry a weight")
        if w not in (0, 1) or isinstance(w, bool):
            raise row.error(f"messages[{i}].weight", f"must be 0 or 1, not {w!r}")
        out.append(int(w))
    return out


def _openai_chat(row: _Row) -> Sample:
    """OpenAI's chat format: every assistant message trains unless its `weight` is 0 (its multi-turn rule)."""
    if "functions" in row.record:
        raise row.error("functions", LEGACY_FUNCTIONS)
    tools = _row_tools(row) if "tools" in row.record else ()
    raw = row.get("messages")
    msgs = _messages(row, "messages", raw, tools=bool(tools))
    if msgs[-1].role != "assistant":
        raise row.error("messages", "the last message must be the assistant's answer to train on")
    names = {t.get("function", t).get("name") for t in tools}
    for i, m in enumerate(msgs):
        for _, name, _ in m.tool_calls:
            if name not in names:
                raise row.error(
                    f"messages[{i}].tool_calls", f"calls {name!r}, which is not in the row's tools"
                )
    weights = _weights(row, raw)
    earlier = tuple(
        i
        for i, m in enumerate(msgs[:-1])
        if m.role == "assistant" and weights[i] and i and msgs[i - 1].role in ("user", "tool")
    )
    if not weights[-1] and not earlier:
        raise row.error("messages", "every assistant message has weight 0: the row trains nothing")
    return Sample(
        _check_prompt(row, "messages", msgs[:-1]),
        msgs[-1].content,
        None,
        row.line,
        trained=earlier,
        answer_trained=bool(weights[-1]),
        tools=tools,
        answer_calls=msgs[-1].tool_calls,
    )


def _prompt_chosen_rejected(row: _Row) -> Sample:
    conv = _prompt_conversation(row, "prompt")
    return Sample(
        conv, row.text("chosen", allow_empty=True), row.text("rejected", allow_empty=True), row.line
    )


def _hh_rlhf(row: _Row) -> Sample:
    sides = {}
    for field in ("chosen", "rejected"):
        msgs = parse_transcript(row.text(field))
        if len(msgs) < 2 or msgs[-1].role != "assistant":
            raise row.error(field, "an HH transcript must end with an 'Assistant:' turn")
        sides[field] = (_check_prompt(row, field, msgs[:-1]), msgs[-1].content)
    if sides["chosen"][0] != sides["rejected"][0]:
        raise row.error(
            "rejected",
            "chosen and rejected must share the conversation before the last Assistant turn",
        )
    return Sample(sides["chosen"][0], sides["chosen"][1], sides["rejected"][1], row.line)


def _sft_pair(row: _Row) -> Sample:
    field = "response" if "response" in row.record else "completion"
    return Sample(_prompt_conversation(row, "prompt"), row.text(field, allow_empty=True), None, row.line)


def _openai_prompt(row: _Row) -> Sample:
    msgs = _messages(row, "messages", row.get("messages"))
    if msgs[-1].role != "user":
        raise row.error(
            "messages",
            "a prompt row (the first row ends with a user turn) must end with a user turn; "
            "the actor writes the answer",
        )
    return Sample(tuple(msgs), "", None, row.line)


def _prompt_only(row: _Row) -> Sample:
    return Sample(_prompt_conversation(row, "prompt"), "", None, row.line)


# shape → (kind, reader, the fields it reads; the others become the sample's item)
SHAPES: dict[str, tuple[Kind, Callable[[_Row], Sample], frozenset[str]]] = {
    "openai_preference": (
        "preference",
        _openai_preference,
        frozenset({"input", "preferred_output", "non_preferred_output"}),
    ),
    "openai_chat": ("sft", _openai_chat, frozenset({"messages"})),
    "rm_static": (
        "preference",
        _prompt_chosen_rejected,
        frozenset({"prompt", "response", "chosen", "rejected"}),
    ),
    "prompt_chosen_rejected": (
        "preference",
        _prompt_chosen_rejected,
        frozenset({"prompt", "chosen", "rejected"}),
    ),
    "hh_rlhf": ("preference", _hh_rlhf, frozenset({"chosen", "rejected"})),
    "sft_pair": ("sft", _sft_pair, frozenset({"prompt", "response", "completion"})),
    "openai_prompt": ("prompt", _openai_prompt, frozenset({"messages"})),
    "prompt_only": ("prompt", _prompt_only, frozenset({"prompt"})),
}
_EXPECTED = (
    "expected one of: {prompt, chosen, rejected}; {prompt, response, chosen, rejected}; "
    "{chosen, rejected} HH transcripts; {prompt, response}; {messages}; "
    "{input, preferred_output, non_preferred_output}; {prompt} (prompts only); {text}"
)


def _ends_with_user(messages: Any) -> bool:
    last = messages[-1] if isinstance(messages, list) and messages else None
    return isinstance(last, dict) and last.get("role") == "user"


def detect_shape(record: Any, *, path: str, line: int) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", path=path, line=line)
    keys = set(record)
    if {"input", "preferred_output", "non_preferred_output"} <= keys:
        return "openai_preference"
    if "messages" in keys:
        return "openai_prompt" if _ends_with_user(record["messages"]) else "openai_chat"
    if {"prompt", "response", "chosen", "rejected"} <= keys:
        return "rm_static"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "prompt_chosen_rejected"
    if {"chosen", "rejected"} <= keys:
        return "hh_rlhf"
    if "prompt" in keys and ({"response", "completion"} & keys):
        return "sft_pair"
    if "text" in keys:
        return "text"
    if "prompt" in keys and not ({"chosen", "rejected"} & keys):
        return "prompt_only"
    raise DataError(f"unknown row shape with fields {sorted(keys)}; {_EXPECTED}", path=path, line=line)


def _read_records(
    records: Iterable[tuple[int, Any]], path: str, max_bad_rows: float = 0.02
) -> tuple[str, list[Sample] | list[str], Counter[str]]:
    """Rows of one file. A row that cannot be used (a transcript without an answer, a wrong type) is
    skipped and counted under `unusable: <reason>`; above `max_bad_rows` of the file the whole file is
    refused, naming the first such lines (a real dataset has a few odd rows; a wrong file has many)."""
    shape: str | None = None
    rows: list[Any] = []
    filtered: Counter[str] = Counter()
    bad: list[DataError] = []
    seen = 0
    for line, record in records:
        if shape is None:
            shape = detect_shape(record, path=path, line=line)
        seen += 1
        try:
            sample = _one_row(shape, record, path, line)
        except DataError as e:
            bad.append(e)
            filtered[f"unusable: {e.field + ': ' if e.field else ''}{e.message}"] += 1
            continue
        if sample is None:
            filtered["empty_text" if shape == "text" else "empty_answer"] += 1
            continue
        rows.append(sample)
    if shape is None:
        raise DataError("the dataset is empty; it needs at least one row", path=path)
    if bad and (len(bad) > max_bad_rows * seen or not rows):
        first = bad[0]
        lines = ", ".join(str(e.line) for e in bad[:5])
        raise DataError(
            f"{len(bad)} of {seen} rows cannot be used (more than max_bad_rows {max_bad_rows:g} of "
            f"the file; first at lines {lines}); the first: {first.message}. Fix those rows, or "
            "raise max_bad_rows to skip them",
            path=path,
            line=first.line,
            field=first.field,
        )
    return shape, rows, filtered


def _one_row(shape: str, record: Any, path: str, line: int) -> Sample | str | None:
    """One record as a sample (or text); None when it is empty and is to be left out."""
    row = _Row(record, path, line)
    if shape == "text":
        text = row.text("text", allow_empty=True)
        return text if text.strip() else None
    kind, read, fields = SHAPES[shape]
    sample = read(row)
    if kind != "prompt" and (
        (not sample.chosen.strip() and not sample.answer_calls)
        or (sample.rejected is not None and not sample.rejected.strip())
    ):
        return None  # real HH data has a few empty answers; count them, don't fail the file
    if item := {k: v for k, v in record.items() if k not in fields}:
        sample = replace(sample, item=item)
    return sample


def _kind(shape: str) -> Kind:
    return "text" if shape == "text" else SHAPES[shape][0]


# ---------------------------------------------------------------------------- sources


def _read_file(path: Path, name: str, limits: ReadLimits) -> Dataset:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    fp = fingerprint(path)
    if ext == ".txt":
        texts = [t for _, t in iter_paragraphs(path, limits)]
        if not texts:
            raise DataError("the dataset is empty; it needs at least one paragraph", path=str(path))
        return Dataset(name, "text", fp, "text", [], texts=texts)
    if ext not in (".json", ".jsonl"):
        raise DataError(
            f"unknown file format {''.join(path.suffixes)!r}; use .jsonl, .json or .txt (optionally .gz), "
            "or a directory saved with datasets' save_to_disk",
            path=str(path),
        )
    shape, rows, filtered = _read_records(iter_json_records(path, limits), str(path), limits.max_bad_rows)
    if shape == "text":
        return Dataset(name, "text", fp, shape, [], texts=rows, filtered=filtered)  # type: ignore[arg-type]
    return Dataset(name, _kind(shape), fp, shape, rows, filtered=filtered)  # type: ignore[arg-type]


def _hf_records(ds: Any) -> Iterable[tuple[int, Any]]:
    return ((i + 1, row) for i, row in enumerate(ds))


def _read_hf(obj: Any, name: str, fp: str) -> Dataset:
    """A `datasets.Dataset` or `DatasetDict` (train split, and test/validation as evaluation)."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if "train" not in obj:
            raise DataError(f"a DatasetDict needs a 'train' split; found {sorted(obj)}", path=name)
        train, ev = obj["train"], next((obj[k] for k in ("test", "validation", "eval") if k in obj), None)
    else:
        train, ev = obj, None
    shape, rows, filtered = _read_records(_hf_records(train), f"{name}[train]")
    if shape == "text":
        return Dataset(name, "text", fp, shape, [], texts=rows, filtered=filtered)  # type: ignore[arg-type]
    eval_rows: Any = None
    if ev is not None and len(ev):
        ev_shape, eval_rows, ev_filtered = _read_records(_hf_records(ev), f"{name}[eval]")
        if ev_shape != shape:
            raise DataError(f"the eval split has shape {ev_shape} but train has {shape}", path=name)
        filtered.update({f"eval_{k}": v for k, v in ev_filtered.items()})
    return Dataset(name, _kind(shape), fp, shape, rows, eval_rows=eval_rows, filtered=filtered)  # type: ignore[arg-type]


def _is_hf_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def read_dataset(spec: str, limits: ReadLimits | None = None) -> Dataset:
    """Read one `--data` value: a bundled name, a file, a `save_to_disk` directory or a hub id."""
    limits = limits or ReadLimits()
    if spec in BUNDLED:
        return _read_file(bundled_path(spec), spec, limits)
    if spec.startswith("bundled:"):
        raise DataError(f"unknown bundled dataset {spec!r}; bundled datasets: {', '.join(BUNDLED)}")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not _is_hf_dir(path):
            raise DataError(
                "a directory must be one written by datasets' save_to_disk (it has no state.json or "
                "dataset_dict.json); pass a .jsonl/.json/.txt file instead",
                path=spec,
            )
        import datasets

        return _read_hf(datasets.load_from_disk(str(path)), spec, fingerprint(path))
    if path.is_file():
        return _read_file(path, spec, limits)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or path.suffix or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise DataError(
            f"no such file or directory, and not a bundled dataset ({', '.join(BUNDLED)})"
            + (
                " (hub ids are not tried: HF_HUB_OFFLINE=1)"
                if os.environ.get("HF_HUB_OFFLINE") == "1"
                else ""
            ),
            path=spec,
        )
    import datasets  # a hub id such as Dahoas/rm-static, where a hub is reachable

    try:
        obj = datasets.load_dataset(spec)
    except Exception as e:  # the hub's errors are many; the user needs the message, not the type
        raise DataError(f"could not load from the hub: {e}", path=spec) from None
    parts = obj.values() if isinstance(obj, datasets.DatasetDict) else [obj]
    return _read_hf(obj, spec, "hub:" + ":".join(d._fingerprint for d in parts))
