"""Every reader on a small file of its shape, gzip included, and every kind of bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from rlhf_engine.data.errors import DataError
from rlhf_engine.data.io import ReadLimits
from rlhf_engine.data.readers import read_dataset
from rlhf_engine.data.types import Message


def write_jsonl(path: Path, rows: list[dict], *, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


U = lambda text: Message("user", text)  # noqa: E731
A = lambda text: Message("assistant", text)  # noqa: E731

HH_CHOSEN = (
    "\n\nHuman: Hi, what is a fox?\n\nAssistant: An animal."
    "\n\nHuman: What colour is it?\n\nAssistant: Often red."
)
HH_REJECTED = (
    "\n\nHuman: Hi, what is a fox?\n\nAssistant: An animal."
    "\n\nHuman: What colour is it?\n\nAssistant: No idea."
)

# shape: (rows of the file, the kind read, the (conversation, chosen, rejected) of each sample)
SHAPES: dict[str, tuple[list[dict[str, Any]], str, list[tuple[tuple[Message, ...], str, str | None]]]] = {
    "prompt_chosen_rejected": (
        [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}],
        "preference",
        [((U("What is 2+2?"),), "4", "5")],
    ),
    "rm_static": (
        [
            {
                "prompt": "\n\nHuman: Name a colour.\n\nAssistant: Red.\n\nHuman: Another?\n\nAssistant:",
                "response": " Blue.",
                "chosen": " Blue.",
                "rejected": " Dog.",
            }
        ],
        "preference",
        [((U("Name a colour."), A("Red."), U("Another?")), " Blue.", " Dog.")],
    ),
    "hh_rlhf": (
        [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}],
        "preference",
        [((U("Hi, what is a fox?"), A("An animal."), U("What colour is it?")), "Often red.", "No idea.")],
    ),
    "sft_pair": (
        [{"prompt": "Say hi.", "response": "Hi!"}, {"prompt": "Say bye.", "response": "Bye!"}],
        "sft",
        [((U("Say hi."),), "Hi!", None), ((U("Say bye."),), "Bye!", None)],
    ),
    "openai_chat": (
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": [{"type": "text", "text": "Paris."}]},
                ]
            }
        ],
        "sft",
        [((Message("system", "Be brief."), U("Capital of France?")), "Paris.", None)],
    ),
    "openai_preference": (
        [
            {
                "input": {"messages": [{"role": "user", "content": "Hello"}]},
                "preferred_output": [{"role": "assistant", "content": "Hi there."}],
                "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
            }
        ],
        "preference",
        [((U("Hello"),), "Hi there.", "Go away.")],
    ),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_reader_shapes(tmp_path: Path, shape: str, gz: bool) -> None:
    rows, kind, expected = SHAPES[shape]
    ds = read_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows, gz=gz)))
    assert ds.format == shape
    assert ds.kind == kind
    assert [(s.conversation, s.chosen, s.rejected) for s in ds.rows] == expected
    assert [s.line for s in ds.rows] == list(range(1, len(rows) + 1))


def test_sft_pair_accepts_completion(tmp_path: Path) -> None:
    ds = read_dataset(str(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "completion": "A"}])))
    assert ds.kind == "sft" and ds.rows[0].chosen == "A"


def test_json_array_and_json_lines_in_dot_json(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps(rows))  # one line, as json.dump writes it
    lines = write_jsonl(tmp_path / "lines.json", rows)  # what datasets' to_json writes
    for path in (arr, lines):
        ds = read_dataset(str(path))
        assert [s.chosen for s in ds.rows] == ["b", "e"]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_plain_text_paragraphs(tmp_path: Path, gz: bool) -> None:
    text = "First paragraph,\nstill first.\n\n\nSecond one.\n"
    path = tmp_path / ("c.txt.gz" if gz else "c.txt")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    ds = read_dataset(str(path))
    assert ds.kind == "text" and ds.texts == ["First paragraph,\nstill first.", "Second one."]


def test_jsonl_text_rows(tmp_path: Path) -> None:
    ds = read_dataset(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])))
    assert ds.kind == "text" and ds.texts == ["one", "two"]


def test_datasets_save_to_disk(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:4]), "test": datasets.Dataset.from_list(rows[4:])}
    )
    dd.save_to_disk(str(tmp_path / "dict"))

    single = read_dataset(str(tmp_path / "single"))
    assert single.format == "prompt_chosen_rejected" and len(single.rows) == 6 and single.eval_rows is None
    split = read_dataset(str(tmp_path / "dict"))
    assert [s.chosen for s in split.rows] == ["good 0", "good 1", "good 2", "good 3"]
    assert [s.chosen for s in split.eval_rows or []] == ["good 4", "good 5"]


def test_empty_answers_are_counted_not_fatal(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "", "rejected": "f"}]
    ds = read_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert len(ds.rows) == 1 and ds.filtered == {"empty_answer": 1}


# ---------------------------------------------------------------------------- bad input


def _error(path: Path, limits: ReadLimits | None = None) -> DataError:
    with pytest.raises(DataError) as e:
        read_dataset(str(path), limits)
    return e.value


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2 + [{"prompt": "a", "chosen": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    err = _error(path)
    assert (err.path, err.line, err.field) == (str(path), 3, "rejected")
    assert str(err).startswith(f"{path}, line 3, field 'rejected': 1 of 3 rows cannot be used")
    assert "the first: missing" in str(err)


def test_malformed_json_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    err = _error(path)
    assert err.line == 2 and "invalid JSON" in str(err)


def test_wrong_type_and_non_object(tmp_path: Path) -> None:
    err = _error(
        write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": 3, "response": "b"}])
    )
    assert (err.line, err.field) == (2, "prompt") and "must be a string" in str(err)
    path = tmp_path / "b.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    assert _error(path).line == 2


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "e.txt").write_text("")
    assert "empty" in str(_error(tmp_path / "e.jsonl"))
    assert "empty" in str(_error(tmp_path / "e.txt"))


def test_unknown_format_and_shape(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    assert "unknown file format '.csv'" in str(_error(tmp_path / "d.csv"))
    err = _error(write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}]))
    assert err.line == 1 and "unknown row shape" in str(err) and "{prompt, chosen, rejected}" in str(err)
    (tmp_path / "plain_dir").mkdir()
    assert "save_to_disk" in str(_error(tmp_path / "plain_dir"))


def test_missing_path_and_unknown_bundled_name() -> None:
    with pytest.raises(DataError, match="no such file"):
        read_dataset("/no/such/file.jsonl")
    with pytest.raises(DataError, match="bundled:sft"):
        read_dataset("bundled:nope")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        read_dataset("Dahoas/rm-static")  # a hub id: refused offline, with the reason


def test_hh_prefix_mismatch(tmp_path: Path) -> None:
    other = HH_REJECTED.replace("What colour", "What size")
    err = _error(
        write_jsonl(
            tmp_path / "hh.jsonl",
            [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": HH_CHOSEN, "rejected": other}],
        )
    )
    assert (err.line, err.field) == (2, "rejected") and "share the conversation" in str(err)
    no_answer = "\n\nHuman: Hi"
    err = _error(write_jsonl(tmp_path / "hh2.jsonl", [{"chosen": no_answer, "rejected": no_answer}]))
    assert err.field == "chosen" and "Assistant" in str(err)


def test_openai_shapes_bad_rows(tmp_path: Path) -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    prompt = {"messages": [{"role": "user", "content": "hi"}]}
    err = _error(write_jsonl(tmp_path / "c.jsonl", [chat, prompt]))  # the first row makes it an SFT file
    assert (err.line, err.field) == (2, "messages") and "last message must be the assistant" in str(err)
    err = _error(write_jsonl(tmp_path / "q.jsonl", [prompt, chat]))  # the first row makes it a prompt file
    assert (err.line, err.field) == (2, "messages") and "must end with a user turn" in str(err)
    err = _error(
        write_jsonl(
            tmp_path / "r.jsonl",
            [{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}],
        )
    )
    assert err.field == "messages[0]" and "need the row's 'tools'" in str(err)
    row = {
        "input": {"messages": [{"role": "user", "content": "x"}]},
        "preferred_output": [{"role": "user", "content": "y"}],
        "non_preferred_output": [],
    }
    assert _error(write_jsonl(tmp_path / "p.jsonl", [row])).field == "preferred_output"


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    err = _error(path)
    assert err.line == 2 and "UTF-8" in str(err)


def test_gzip_caps_and_corruption(tmp_path: Path) -> None:
    rows = [{"prompt": "q" * 100, "response": "a"}] * 50
    path = write_jsonl(tmp_path / "d.jsonl", rows, gz=True)
    assert len(read_dataset(str(path)).rows) == 50
    # a "bomb": small on disk, over the cap once decompressed
    err = _error(path, ReadLimits(max_bytes=2000))
    assert "larger than the limit of 2000 bytes" in str(err)
    err = _error(path, ReadLimits(max_line_bytes=64))
    assert err.line == 1 and "longer than the limit of 64 bytes" in str(err)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(path.read_bytes()[:-20])
    assert "corrupt or truncated gzip" in str(_error(truncated))
    garbage = tmp_path / "bad.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    assert "gzip" in str(_error(garbage))


# ---------------------------------------------------------------- real HH-RLHF shapes


def _hh(q: str, a: str, *, before: str = "") -> str:
    return f"{before}\n\nHuman: {q}\n\nAssistant: {a}"


def test_hh_answers_that_contain_human_are_one_answer(tmp_path: Path) -> None:
    """harmless-base has answers like '…\\n\\nAssistant: Human: No, you are racist…' (1.6% of its test
    file parsed wrongly when turns were split on ' Human:' anywhere)."""
    chosen = _hh("Why are you racist?", "Human: No, you are racist. Assistant: see?")
    rejected = _hh("Why are you racist?", "I am not.")
    ds = read_dataset(str(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])))
    [row] = ds.rows
    assert row.conversation == (Message("user", "Why are you racist?"),)
    assert row.chosen == "Human: No, you are racist. Assistant: see?" and row.rejected == "I am not."


def test_hh_multi_turn_and_deepspeed_chat_layout(tmp_path: Path) -> None:
    multi = _hh("And its colour?", "Red.", before=_hh("What is a fox?", "An animal."))
    ds = read_dataset(
        str(write_jsonl(tmp_path / "m.jsonl", [{"chosen": multi, "rejected": multi[:-4] + "Blue."}]))
    )
    assert [m.role for m in ds.rows[0].conversation] == ["user", "assistant", "user"]
    assert (ds.rows[0].chosen, ds.rows[0].rejected) == ("Red.", "Blue.")
    # DeepSpeed-Chat's own layout has no blank lines: the words split it
    flat = {
        "prompt": " Human: What is a fox? Assistant: An animal. Human: Its colour? Assistant:",
        "chosen": "Red.",
        "rejected": "Blue.",
    }
    ds = read_dataset(str(write_jsonl(tmp_path / "f.jsonl", [flat])))
    assert [m.content for m in ds.rows[0].conversation] == ["What is a fox?", "An animal.", "Its colour?"]


def test_a_few_unusable_rows_are_skipped_and_counted_too_many_refuse_the_file(tmp_path: Path) -> None:
    good = {"chosen": _hh("Hi?", "Hello."), "rejected": _hh("Hi?", "Go away.")}
    no_answer = {"chosen": "\n\nHuman: Hi?", "rejected": "\n\nHuman: Hi?"}  # harmless-base line 30's kind
    differ = {
        "chosen": _hh("Hi?", "Hello."),
        "rejected": _hh("Bye?", "Go away."),
    }  # differ before the last turn
    empty = {"chosen": _hh("Hi?", ""), "rejected": _hh("Hi?", "Go away.")}
    rows = [good] * 97 + [no_answer, differ, empty]
    ds = read_dataset(str(write_jsonl(tmp_path / "few.jsonl", rows)))
    assert len(ds.rows) == 97
    assert ds.filtered["empty_answer"] == 1
    assert sum(n for k, n in ds.filtered.items() if k.startswith("unusable: ")) == 2
    assert any("chosen: an HH transcript must end with an 'Assistant:' turn" in k for k in ds.filtered)
    many = [good] * 10 + [no_answer] * 3
    with pytest.raises(DataError, match=r"3 of 13 rows cannot be used .*first at lines 11, 12, 13"):
        read_dataset(str(write_jsonl(tmp_path / "many.jsonl", many)))
    assert (
        len(read_dataset(str(write_jsonl(tmp_path / "m2.jsonl", many)), ReadLimits(max_bad_rows=0.5)).rows)
        == 10
    )


def test_prompt_only_rows_keep_their_other_fields_as_the_item(tmp_path: Path) -> None:
    """OpenAI's reinforcement rows (messages ending with the user's turn, plus fields for the grader)
    and {prompt} rows are prompt-only data: step 3 alone uses them, with the extra fields as `item`."""
    rows: list[dict[str, Any]] = [
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "reference_answer": "4",
            "meta": {"level": 1},
        },
        {"messages": [{"role": "user", "content": "3+3?"}], "reference_answer": "6"},
    ]
    d = read_dataset(str(write_jsonl(tmp_path / "rft.jsonl", rows)))
    assert (d.kind, d.format, len(d)) == ("prompt", "openai_prompt", 2)
    assert d.rows[0].conversation[-1].content == "2+2?" and d.rows[0].chosen == ""
    assert d.rows[0].item == {"reference_answer": "4", "meta": {"level": 1}}
    assert d.rows[1].item == {"reference_answer": "6"}
    d = read_dataset(str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?", "subject": "dog"}])))
    assert (d.kind, d.format, d.rows[0].item) == ("prompt", "prompt_only", {"subject": "dog"})
    # an SFT row's fields beyond its shape are its item too; rows without any have none
    d = read_dataset(
        str(
            write_jsonl(
                tmp_path / "s.jsonl",
                [{"prompt": "a", "response": "b", "id": 7}, {"prompt": "c", "response": "d"}],
            )
        )
    )
    assert [r.item for r in d.rows] == [{"id": 7}, None]


def test_openai_multi_turn_rows_train_every_assistant_turn_unless_weight_0(tmp_path: Path) -> None:
    """OpenAI's multi-turn rule: each assistant message trains (weight 1 by default), weight 0 keeps it as
    context only; rows with tools are refused with the reason, never trained as if they had none."""

    def turn(role: str, text: str, **extra: int) -> dict[str, object]:
        return {"role": role, "content": text, **extra}

    rows = [
        {"messages": [turn("user", "a"), turn("assistant", "b"), turn("user", "c"), turn("assistant", "d")]},
        {
            "messages": [
                turn("system", "s"),
                turn("user", "a"),
                turn("assistant", "b", weight=0),
                turn("user", "c"),
                turn("assistant", "d"),
            ]
        },
        {
            "messages": [
                turn("user", "a"),
                turn("assistant", "b"),
                turn("user", "c"),
                turn("assistant", "d", weight=0),
            ]
        },
    ]
    ds = read_dataset(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert [(s.trained, s.answer_trained) for s in ds.rows] == [((1,), True), ((), True), ((1,), False)]
    nothing = {"messages": [turn("user", "a"), turn("assistant", "b", weight=0)]}
    err = _error(write_jsonl(tmp_path / "z.jsonl", [nothing]))
    assert err.field == "messages" and "trains nothing" in str(err)
    odd = {"messages": [turn("user", "a"), turn("assistant", "b", weight=2)]}
    assert _error(write_jsonl(tmp_path / "w.jsonl", [odd])).field == "messages[1].weight"
    tools = {"messages": [turn("user", "a"), turn("assistant", "b")], "tools": [{"type": "function"}]}
    err = _error(write_jsonl(tmp_path / "t.jsonl", [tools]))
    assert err.field == "tools[0].function" and "name" in str(err)


def test_function_calling_rows_train_the_calls(tmp_path: Path, base_model: Path) -> None:
    """OpenAI's function-calling fine-tuning rows: tools, assistant tool_calls, tool results. The calls and
    the answer after the results train; the prompt shows the tools (rlhf_engine/data/tools.py)."""
    from transformers import AutoTokenizer

    from rlhf_engine.data.tokenize import tokenize_rows

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    ask = {"role": "user", "content": "Weather in Oslo?"}
    rows = [
        {"messages": [ask, {"role": "assistant", "tool_calls": [call]}], "tools": tools},
        {
            "messages": [
                ask,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."},
            ],
            "tools": tools,
            "parallel_tool_calls": False,
        },
    ]
    ds = read_dataset(str(write_jsonl(tmp_path / "f.jsonl", rows)))
    first, second = ds.rows
    assert first.answer_calls == (("c1", "get_weather", '{"city": "Oslo"}'),) and first.chosen == ""
    assert (
        second.trained == (1,) and second.chosen == "It is sunny." and second.conversation[2].role == "tool"
    )
    tok = AutoTokenizer.from_pretrained(base_model)
    out, _ = tokenize_rows(1, ds.rows, tok, max_seq_len=2048, max_prompt_len=2048)
    (ids, prompt_len, _), (ids2, _, spans) = out
    assert "<tools>" in tok.decode(ids[:prompt_len])  # the prompt shows the tools
    trained = tok.decode(ids[prompt_len:])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in trained
    assert spans and '"city": "Oslo"' in tok.decode(ids2[spans[0] : spans[1]])  # the earlier call trains too
    # bad rows name the field
    bad: list[tuple[dict[str, Any], str]] = [
        ({"messages": [ask, {"role": "assistant", "tool_calls": [call]}], "tools": []}, "tools"),
        (
            {
                "messages": [ask, {"role": "assistant", "tool_calls": [call | {"function": {"name": "rm"}}]}],
                "tools": tools,
            },
            "messages[1].tool_calls",
        ),
        (
            {
                "messages": [
                    ask,
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "get_weather", "arguments": "{x"}}],
                    },
                ],
                "tools": tools,
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {
                "messages": [ask, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
                "tools": tools,
            },
            "messages[1].tool_call_id",
        ),
        ({"messages": [ask, {"role": "assistant", "content": "y"}], "functions": []}, "functions"),
    ]
    for i, (row, field) in enumerate(bad):
        assert _error(write_jsonl(tmp_path / f"b{i}.jsonl", [row])).field == field, row
