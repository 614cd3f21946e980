"""Multi-turn chat: the history rendered by the shared formatter, `clear`, and `rlhf chat` in a pipe."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_engine.chat import ChatGenerator, SamplingParams
from rlhf_engine.chat.session import ChatSession
from rlhf_engine.data.formatter import render_prompt
from tests.runs import rlhf

GREEDY = SamplingParams(temperature=0, max_new_tokens=20)


@pytest.fixture(scope="module")
def engine(base_model: Path) -> Iterator[ChatGenerator]:
    with ChatGenerator.load(str(base_model)) as e:
        yield e


def test_turns_build_a_history_rendered_by_the_shared_formatter(engine: ChatGenerator) -> None:
    session = ChatSession(engine, GREEDY)
    first = "".join(session.send("What is a dog?"))
    second = "".join(session.send("And the cat?"))
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first.strip()
    # the second turn saw the first: its prompt is the whole conversation, DeepSpeed-Chat's layout
    convo = session.history[:3]
    assert render_prompt(convo, engine.tokenizer) == (
        f" Human: What is a dog? Assistant: {first.strip()} Human: And the cat? Assistant:"
    )
    assert second == engine.generate(convo, GREEDY).choices[0].text
    session.clear()
    assert session.history == []
    assert "".join(session.send("What is a dog?")) == first


def test_oldest_turns_are_dropped_when_the_context_is_full(engine: ChatGenerator) -> None:
    session = ChatSession(engine, SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True))
    long = "tell me about the dog " * 30  # ≈150 tokens a turn, ≈250 with the reply; the context is 512
    for _ in range(3):
        assert "".join(session.send(long))
    assert session.dropped >= 1
    assert len(session.history) <= 4


def test_rlhf_chat_in_a_pipe(base_model: Path) -> None:
    script = "What is a dog?\nAnd the cat?\nclear\nWhat is a dog?\nquit\nnever read\n"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_engine.cli",
            "chat",
            "--path",
            str(base_model),
            "--temperature",
            "0",
            "--max-new-tokens",
            "20",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    replies = [line for line in done.stdout.splitlines() if line.startswith("Assistant:")]
    assert len(replies) == 3
    assert replies[0] == replies[2]  # after `clear` the same question gets the same greedy answer
    assert "(conversation cleared)" in done.stderr
    assert "Chatting with" in done.stderr and "transformers backend" in done.stderr


def test_rlhf_chat_ends_at_eof_and_reports_bad_options(base_model: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_engine.cli", "chat", "--path", str(base_model), "--max-new-tokens", "5"],
        input="Hi\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.count("Assistant:") == 1
    bad = rlhf("chat", "--path", base_model, "--temperature", "3")
    assert bad.returncode == 2 and "temperature: 3.0 must be between 0 and 2" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = rlhf("chat", "--path", tmp_path / "nope")
    assert missing.returncode == 2 and "model_path:" in missing.stderr and "does not exist" in missing.stderr
