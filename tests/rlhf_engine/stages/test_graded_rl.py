"""Step 3 with a grader as the reward (`rlhf ppo --grader`): GRPO on the bundled verifiable task
(`bundled:questions`: the answer must name the subject asked about) raises the held-out pass rate of
the shared run's SFT model, with no reward model or critic loaded; a killed run resumes with identical
metrics; a multi grader's parts (a similarity, a reward model as score_model) are each recorded; a
grader that cannot work is refused before any model is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlhf_engine.data.bundled.world import SUBJECTS
from rlhf_engine.stages.heldout import heldout_report
from rlhf_engine.stages.records import read_jsonl
from tests.runs import kill_after_first_checkpoint, rlhf, rlhf_ok

NAMES_SUBJECT = {
    "type": "string_check",
    "name": "names_subject",
    "operation": "ilike",
    "input": "{{sample.output_text}}",
    "reference": "{{item.subject}}",
}
SMALL = [
    "--data",
    "bundled:questions",
    "--samples-per-prompt",
    4,
    "--per-device-generation-batch-size",
    4,
    "--per-device-training-batch-size",
    16,
    "--max-answer-len",
    32,
    "--actor-learning-rate",
    3e-4,
    "--num-warmup-steps",
    0,
    "--max-seq-len",
    128,
    "--max-prompt-len",
    64,
]
GRPO = ["--algorithm", "grpo", "--max-steps", 30, "--checkpoint-interval", 10, "--eval-max-rows", 200]


def _args(pipeline_run: Path, out: Path, grader: object, *extra: object) -> list[object]:
    return [
        "ppo",
        "--actor-model",
        pipeline_run / "step1_sft",
        "--grader",
        json.dumps(grader),
        "--output-dir",
        out,
        *SMALL,
        *extra,
    ]


@pytest.fixture(scope="module")
def graded_run(tmp_path_factory: pytest.TempPathFactory, pipeline_run: Path) -> Path:
    out = tmp_path_factory.mktemp("graded")
    rlhf_ok(*_args(pipeline_run, out, NAMES_SUBJECT, *GRPO))
    return out / "step3_rlhf"


def test_grpo_with_a_string_check_grader_raises_the_held_out_pass_rate(
    graded_run: Path, pipeline_run: Path
) -> None:
    summary = json.loads((graded_run / "summary.json").read_text())
    assert summary["algorithm"] == "grpo"
    assert summary["engines"] == {
        "actor": 1,
        "ref": 1,
    }  # the grader is the reward: no reward model, no critic
    # the step's own evaluation: the grader's pass rate on held-out prompts of the file (200), before and
    # after (measured: 40.0% → 80.5% at KL 0.08 in 30 steps, 5 s)
    assert summary["eval_reward_after"] >= summary["eval_reward_before"] + 0.15, summary
    assert summary["eval_kl_to_ref_after"] < 0.5, summary
    # and checked apart from the grader, on 200 questions of no bundled file (`rlhf eval`'s report)
    sft, rm = str(pipeline_run / "step1_sft"), str(pipeline_run / "step2_reward")
    before = heldout_report(sft, reference=sft, reward_model=rm, n=200)
    after = heldout_report(str(graded_run / "actor"), reference=sft, reward_model=rm, n=200)
    assert after["subject_rate"] >= before["subject_rate"] + 0.15, (before, after)
    metrics = read_jsonl(graded_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert all(m["grader_names_subject"] == m["reward_mean"] for m in metrics)  # one part: the reward itself
    rollouts = read_jsonl(graded_run / "rollouts.jsonl")
    assert rollouts and all(r["grades"] == {"names_subject": r["reward"]} for r in rollouts)
    for r in rollouts:  # the reward is what the grader says of the answer the user would see
        subject = next(s for s in SUBJECTS if re.search(rf"\b{s}\b", r["prompt"]))
        assert r["reward"] == float(subject in r["answer"].lower()), r


def test_a_python_grader_in_the_sandbox_teaches_the_same(
    graded_run: Path, pipeline_run: Path, tmp_path: Path
) -> None:
    """The same check written as OpenAI's python grader (run in the bubblewrap sandbox, one sandbox per
    batch of answers) gives the same rewards, so GRPO learns the same: the held-out pass rate rises by
    the same ≥ 15 points, step for step."""
    python = {
        "type": "python",
        "name": "names_subject",
        "source": "def grade(sample, item):\n"
        "    return 1.0 if item['subject'].lower() in sample['output_text'].lower() else 0.0\n",
    }
    rlhf_ok(*_args(pipeline_run, tmp_path, python, *GRPO))
    summary = json.loads((tmp_path / "step3_rlhf" / "summary.json").read_text())
    assert summary["eval_reward_after"] >= summary["eval_reward_before"] + 0.15, summary
    ours = read_jsonl(tmp_path / "step3_rlhf" / "metrics.jsonl")
    straight = read_jsonl(graded_run / "metrics.jsonl")
    for key in ("reward_mean", "grader_names_subject", "kl_to_ref"):
        assert [m[key] for m in ours] == pytest.approx([m[key] for m in straight], abs=1e-6), key
    assert all(m["grader_error_rate"] == 0.0 for m in ours)


def test_a_killed_graded_run_resumes_with_identical_metrics(
    graded_run: Path, pipeline_run: Path, tmp_path: Path
) -> None:
    args = _args(pipeline_run, tmp_path, NAMES_SUBJECT, *GRPO, "--eval-max-rows", 16)
    assert kill_after_first_checkpoint(args, tmp_path / "step3_rlhf") == 10
    rlhf_ok(*args)
    resumed = read_jsonl(tmp_path / "step3_rlhf" / "metrics.jsonl")
    straight = read_jsonl(graded_run / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, 31))
    for key in ("reward_mean", "grader_names_subject", "loss", "kl_to_ref", "answer_len"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in straight], abs=1e-6), key


def test_a_multi_grader_records_each_part_with_a_reward_model_among_them(
    pipeline_run: Path, tmp_path: Path
) -> None:
    grader = {
        "type": "multi",
        "calculate_output": "subject + 0.5 * color + 0.1 * rm",
        "graders": {
            "subject": NAMES_SUBJECT,
            "color": {
                "type": "text_similarity",
                "evaluation_metric": "fuzzy_match",
                "input": "{{sample.output_text}}",
                "reference": "{{item.facts.color}}",
            },
            "rm": {"type": "score_model", "model": str(pipeline_run / "step2_reward"), "range": [-1, 1]},
        },
    }
    rlhf_ok(
        *_args(pipeline_run, tmp_path, grader, "--algorithm", "rloo", "--max-steps", 2, "--eval-max-rows", 8)
    )
    step = tmp_path / "step3_rlhf"
    assert json.loads((step / "summary.json").read_text())["engines"] == {
        "actor": 1,
        "ref": 1,
        "score_model": 1,
    }
    for m in read_jsonl(step / "metrics.jsonl"):
        parts = m["grader_subject"] + 0.5 * m["grader_color"] + 0.1 * m["grader_rm"]
        assert m["reward_mean"] == pytest.approx(parts, abs=1e-5)
        assert -1 <= m["grader_rm"] <= 1 and 0 <= m["grader_color"] <= 1
    for r in read_jsonl(step / "rollouts.jsonl"):
        g = r["grades"]
        assert set(g) == {"subject", "color", "rm"}
        assert r["reward"] == pytest.approx(g["subject"] + 0.5 * g["color"] + 0.1 * g["rm"], abs=1e-5)


@pytest.mark.parametrize(
    ("grader", "extra", "message"),
    [
        (
            {**NAMES_SUBJECT, "reference": "{{item.answer}}"},
            [],
            "grader: the grader reads {{item.answer}} but the "
            "row has no field 'answer' (its fields: facts, subject, topic) (training row 1",
        ),
        (
            {"type": "python", "source": "def score(s, i): return 1"},
            [],
            "grader.source: defines no top-level function grade(sample, item)",
        ),
        ({**NAMES_SUBJECT, "operation": "regex"}, [], "grader.operation: 'regex'"),
        (
            NAMES_SUBJECT,
            ["--reward-model", "STEP2"],
            "reward_model_name_or_path: with a grader, the grader is",
        ),
        ("not json", [], "grader: cannot read 'not json'"),
    ],
)
def test_a_grader_that_cannot_work_is_refused_before_training(
    grader: object, extra: list[object], message: str, pipeline_run: Path, tmp_path: Path
) -> None:
    extra = [pipeline_run / "step2_reward" if e == "STEP2" else e for e in extra]
    args = _args(pipeline_run, tmp_path, grader, "--algorithm", "grpo", *extra)
    if isinstance(grader, str):
        args[args.index("--grader") + 1] = grader
    done = rlhf(*args)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "step3_rlhf" / "metrics.jsonl").exists()


def test_answers_sampled_under_a_response_format_are_json_graders_can_read(
    pipeline_run: Path, tmp_path: Path
) -> None:
    """A reinforcement job's response_format: step 3 samples every answer under the schema (constrained
    decoding), so a grader reading {{sample.output_json.subject}} never meets an answer that is not JSON."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "subject": {"enum": list(SUBJECTS)},
            "size": {"enum": ["tiny", "small", "big", "huge"]},
        },
        "required": ["subject", "size"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "fact", "schema": schema, "strict": True}}
    grader = {**NAMES_SUBJECT, "operation": "eq", "input": "{{sample.output_json.subject}}"}
    rlhf_ok(
        *_args(pipeline_run, tmp_path, grader, "--algorithm", "grpo", "--max-steps", 2, "--eval-max-rows", 8),
        "--max-answer-len",
        64,
        "--response-format",
        json.dumps(fmt),
    )
    rollouts = read_jsonl(tmp_path / "step3_rlhf" / "rollouts.jsonl")
    assert rollouts
    for r in rollouts:
        answer = json.loads(r["answer"])
        jsonschema.validate(answer, schema)
        subject = next(s for s in SUBJECTS if re.search(rf"\b{s}\b", r["prompt"]))
        assert r["reward"] == float(answer["subject"] == subject), r
    bad = rlhf(
        *_args(pipeline_run, tmp_path / "bad", NAMES_SUBJECT, "--algorithm", "grpo"),
        "--response-format",
        '{"type": "xml"}',
    )
    assert bad.returncode != 0 and "response_format.type" in bad.stderr and "Traceback" not in bad.stderr
