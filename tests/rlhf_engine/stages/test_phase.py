"""A step's phase report (rlhf_engine/stages/phase.py): what the worker reads to tell a slow step from a
stalled one, and what people read in the step's log."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from rlhf_engine.runtime import fencing
from rlhf_engine.stages import phase


@pytest.fixture
def quick_beat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(phase, "BEAT_S", 0.05)
    monkeypatch.setattr(phase, "TICK_S", 0.0)


def test_the_report_follows_the_phases_and_the_training_steps(tmp_path: Path, quick_beat: None) -> None:
    out = io.StringIO()
    p = phase.Phases(tmp_path, enabled=True, title="step 1 (SFT)", stream=out, every_s=60)
    p.enter("building_ops", typical_s=45)
    state = phase.read(tmp_path)
    assert state is not None and state["phase"] == "building_ops" and state["typical_s"] == 45
    assert out.getvalue().startswith("step 1 (SFT): building DeepSpeed ops: 0 s, usually 45 s")
    first_beat = state["beat"]
    deadline = time.monotonic() + 30
    while (state := phase.read(tmp_path)) is not None and state["beat"] == first_beat:  # the next beat
        assert time.monotonic() < deadline, "the phase report did not beat"
        time.sleep(0.01)
    assert state is not None and state["beat"] > first_beat  # alive, though the phase made no progress
    assert state["progress_at"] == state["since"]
    p.tick()  # headway inside the phase (rows tokenised, a batch evaluated)
    state = phase.read(tmp_path)
    assert state is not None and state["progress_at"] > state["since"]

    for step in range(3):
        p.training(step, 3, estimate_s=0.5)
        time.sleep(0.05)
    state = phase.read(tmp_path)
    assert state is not None and state["label"] == "training step 3 of 3" and state["global_step"] == 2
    assert state["typical_s"] < 0.5  # the steps seen so far (median), no longer the estimate
    p.enter("saving_model")
    p.close()
    lines = phase.history(tmp_path)
    assert [line["phase"] for line in lines] == ["building_ops", "training", "saving_model"]
    training = lines[1]  # a run of training steps is one line
    assert (
        training["steps"] == 3
        and training["label"] == "training steps 1-3"
        and 0.04 < training["longest_s"] < 1
    )


def test_phase_describe_reads_as_a_person_would() -> None:
    state = {"label": "building DeepSpeed ops", "since": 100.0, "typical_s": 45.0}
    assert phase.describe(state, now=138.4) == "building DeepSpeed ops: 38 s, usually 45 s"
    assert phase.describe({"label": "tokenising data", "since": 0.0, "typical_s": None}, now=75) == (
        "tokenising data: 1 min 15 s"
    )


def test_a_superseded_attempt_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quick_beat: None
) -> None:
    monkeypatch.setenv(fencing.ATTEMPT_ENV, "1")
    fencing.write_fence(tmp_path, 1)
    fencing._set_fence(tmp_path)
    try:
        p = phase.Phases(tmp_path, enabled=True, stream=io.StringIO())
        p.enter("loading_model")
        assert phase.read(tmp_path)["phase"] == "loading_model"  # type: ignore[index]
        fencing.write_fence(tmp_path, 2)  # a newer attempt took the folder
        (tmp_path / phase.PHASE_FILE).write_text(json.dumps({"phase": "starting", "attempt": "2"}))
        p.enter("training")
        time.sleep(0.2)  # beats too
        p.close()
        assert phase.read(tmp_path) == {"phase": "starting", "attempt": "2"}
        assert [line["phase"] for line in phase.history(tmp_path)] == []
    finally:
        fencing._set_fence_none()


def test_a_rank_that_does_not_report_writes_no_files(tmp_path: Path) -> None:
    p = phase.Phases(tmp_path / "step", enabled=False)
    p.enter("tokenizing")
    p.tick()
    p.close()
    assert not (tmp_path / "step").exists()
