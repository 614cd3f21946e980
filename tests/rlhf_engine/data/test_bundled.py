"""The bundled data: deterministic, and a property that is checkable, prompt-dependent and learnable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rlhf_engine.config.data import DataConfig
from rlhf_engine.data.bundled import BUNDLED, N_PREFERENCE, N_SFT, bundled_path, generate, heldout_questions
from rlhf_engine.data.bundled.world import QUESTIONS, Question, on_topic, topics_of
from rlhf_engine.data.prepare import load_datasets, slice_all


def test_generator_is_deterministic(tmp_path: Path) -> None:
    generate(tmp_path / "a")
    generate(tmp_path / "b")
    for d in BUNDLED.values():
        assert (tmp_path / "a" / d.filename).read_bytes() == (tmp_path / "b" / d.filename).read_bytes()
        assert (tmp_path / "a" / d.filename).read_bytes() == bundled_path(d.name).read_bytes()


def test_property_base_rate_in_step1_data_is_between_30_and_50_percent() -> None:
    config = DataConfig()  # what every step uses when --data is omitted
    slices = slice_all(config, load_datasets(config))
    rows = [r for sl in slices for r in sl.train[0]]
    rate = sum(on_topic(r.prompt_text, r.chosen) for r in rows) / len(rows)
    assert 0.30 <= rate <= 0.50, rate  # 41.7% with the defaults
    sft = load_datasets(config, names=["bundled:sft"])[0]
    sft_rate = sum(on_topic(r.prompt_text, r.chosen) for r in sft.rows) / len(sft.rows)
    assert 0.30 <= sft_rate <= 0.50


def test_preference_is_the_property_and_depends_on_the_prompt() -> None:
    pref = load_datasets(DataConfig(), names=["bundled:preference"])[0]
    assert len(pref.rows) == N_PREFERENCE
    assert all(on_topic(r.prompt_text, r.chosen) for r in pref.rows)
    assert not any(on_topic(r.prompt_text, r.rejected or "") for r in pref.rows)
    # No fixed answer has the property for every question: each chosen answer is on topic for
    # exactly one of the five kinds of question about its subject.
    prompts = [Question("dog", t, "the", "").text for t in (0, 2, 4, 6, 7)]  # color, size, place, habit, all
    for r in pref.rows[:300]:
        assert sum(on_topic(p, r.chosen) for p in prompts) == 1, r.chosen
    # the answer that states everything is off topic for every specific question
    everything = "The dog is big and brown. It is found in the barn and likes to run."
    assert topics_of(everything) == {"color", "size", "place", "habit"}
    assert [on_topic(p, everything) for p in prompts] == [False, False, False, False, True]
    assert len({t for _, t in QUESTIONS}) == 5


def test_heldout_questions_are_in_no_file() -> None:
    held = {q.text for q in heldout_questions()}
    assert len(held) >= 1000
    for name in ("bundled:sft", "bundled:preference"):
        with open(bundled_path(name)) as f:
            prompts = {json.loads(line)["prompt"] for line in f}
        assert not held & prompts
    assert len(load_datasets(DataConfig(), names=["bundled:sft"])[0].rows) == N_SFT


def test_data_list_names_the_bundled_datasets() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rlhf_engine.cli", "data", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed = {d["name"]: d for d in json.loads(out)}
    assert set(listed) == set(BUNDLED)
    assert (
        listed["bundled:sft"]["default_for"] == "data"
        and listed["bundled:corpus"]["default_for"] == "unsup_data"
    )
    assert all(Path(d["path"]).is_file() for d in listed.values())
