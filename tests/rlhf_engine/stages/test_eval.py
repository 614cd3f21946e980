"""`rlhf eval` refuses a reward model that is not one: a causal LM loads with a new, random score head
(and used to end in a traceback deep in the scoring); the error names the field and what to give."""

from __future__ import annotations

from pathlib import Path

from tests.runs import rlhf


def test_eval_with_a_causal_lm_as_reward_model_names_the_field(base_model: Path) -> None:
    done = rlhf(
        "eval",
        "--model",
        base_model,
        "--reference",
        base_model,
        "--reward-model",
        base_model,
        "--questions",
        4,
        timeout=120,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "reward_model: " in done.stderr and "without a reward head" in done.stderr, done.stderr
    assert "RUN/step2_reward" in done.stderr
