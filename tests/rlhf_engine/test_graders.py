"""Graders in OpenAI's shapes: each type's score worked out by hand, templates over the sample and the
row, safe formulas, and every way a grader can be wrong refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from rlhf_engine.graders import GraderError, Multi, check_row, parse, run, similarity

OUT = "{{sample.output_text}}"


def check(operation: str, reference: str = "{{item.answer}}") -> dict[str, Any]:
    return {"type": "string_check", "name": "c", "input": OUT, "reference": reference, "operation": operation}


@pytest.mark.parametrize(
    ("operation", "sample", "score"),
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),
        ("ne", "Rome", 1.0),
        ("ne", "Paris", 0.0),
        ("like", "It is Paris.", 1.0),
        ("like", "It is paris.", 0.0),
        ("ilike", "IT IS PARIS", 1.0),
        ("ilike", "Rome", 0.0),
    ],
)
def test_string_check_operations(operation: str, sample: str, score: float) -> None:
    assert run(parse(check(operation)), sample, {"answer": "Paris"}).reward == score


def test_templates_read_the_sample_and_nested_row_fields() -> None:
    g = parse(check("eq", "{{ item.meta.city }}!"))
    assert g.item_fields() == {"meta.city"}
    assert run(g, "Oslo!", {"meta": {"city": "Oslo"}}).reward == 1.0
    numbers = parse(check("eq", "{{item.n}}"))  # non-strings are compared as their JSON
    assert run(numbers, "42", {"n": 42}).reward == 1.0
    with pytest.raises(GraderError, match="no field 'meta.city'"):
        run(g, "Oslo!", {"meta": {}})
    with pytest.raises(GraderError, match=r"item: .*no field 'answer'.*its fields: question"):
        check_row(parse(check("eq")), {"question": "?"})
    with pytest.raises(GraderError) as e:
        parse(check("eq", "{{sample.output_json}}"))
    assert e.value.param == "grader.reference"


def test_text_similarity_metrics_against_hand_values() -> None:
    # fuzzy_match is rapidfuzz's normalised Indel ratio: "kitten" vs "sitting" → 1 − 5/13
    assert similarity("fuzzy_match", "kitten", "sitting") == pytest.approx(1 - 5 / 13)
    assert similarity("fuzzy_match", "same", "same") == 1.0
    # rouge_1: 3 of the sample's 3 words in the 6-word reference → P 1, R 0.5, F 2/3
    assert similarity("rouge_1", "the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert similarity("rouge_l", "the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert similarity("rouge_5", "the cat sat", "the cat sat on the mat") == 0.0  # no 5-gram
    assert similarity("bleu", "the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert 0 < similarity("bleu", "the cat sat on a mat", "the cat sat on the mat") < 1
    assert similarity("gleu", "the cat sat on a mat", "the cat sat on the mat") == pytest.approx(11 / 18)
    assert similarity("bleu", "", "the cat") == 0.0
    g = parse(
        {
            "type": "text_similarity",
            "input": OUT,
            "reference": "{{item.ref}}",
            "evaluation_metric": "rouge_1",
            "pass_threshold": 0.5,
        }
    )
    assert run(g, "the cat sat", {"ref": "the cat sat on the mat"}).reward == pytest.approx(2 / 3)


def test_multi_combines_named_graders_by_a_parsed_formula() -> None:
    g = parse(
        {
            "type": "multi",
            "name": "both",
            "graders": {
                "exact": check("eq"),
                "close": {
                    "type": "text_similarity",
                    "input": OUT,
                    "reference": "{{item.answer}}",
                    "evaluation_metric": "fuzzy_match",
                },
            },
            "calculate_output": "0.5 * exact + 0.5 * close ^ 2",
        }
    )
    assert isinstance(g, Multi)
    out = run(g, "Paris", {"answer": "Paris"})
    assert out.reward == 1.0 and out.sub_rewards == {"exact": 1.0, "close": 1.0}
    # "Pari" vs "Paris": ratio 1 − 1/9 = 8/9 → 0.5·0 + 0.5·(8/9)²
    assert run(g, "Pari", {"answer": "Paris"}).reward == pytest.approx(0.5 * (8 / 9) ** 2)
    funcs = parse(
        {
            "type": "multi",
            "graders": {"a": check("eq")},
            "calculate_output": "max(0, min(1, sqrt(a) + floor(1.5) - ceil(0.2) + abs(-a) "
            "- exp(0) + log(1)))",
        }
    )
    assert run(funcs, "Paris", {"answer": "Paris"}).reward == 1.0
    zero = parse({"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "1 / a"})
    with pytest.raises(GraderError) as e:
        run(zero, "Rome", {"answer": "Paris"})
    assert e.value.param == "grader.calculate_output"


def test_score_model_clamps_to_its_range_and_needs_a_scorer() -> None:
    g = parse({"type": "score_model", "name": "rm", "model": "ft:tiny:x:job-1", "range": [-1, 1]})
    assert g.score_models() == {"ft:tiny:x:job-1"}
    seen = []

    def scorer(model: str, sample: str, item: dict[str, Any]) -> float:
        seen.append((model, sample))
        return 3.5

    assert run(g, "an answer", {}, scorer).reward == 1.0 and seen == [("ft:tiny:x:job-1", "an answer")]
    with pytest.raises(GraderError, match="inside training jobs"):
        run(g, "an answer", {})


BAD = [
    ("not an object", "grader"),
    ({"type": "python", "source": "def grade(s, i): return 1"}, "grader.type"),
    ({"type": "regex"}, "grader.type"),
    ({**check("eq"), "operation": "startswith"}, "grader.operation"),
    ({"type": "string_check", "input": OUT, "operation": "eq"}, "grader.reference"),
    ({**check("eq"), "input": 5}, "grader.input"),
    (
        {"type": "text_similarity", "input": OUT, "reference": "x", "evaluation_metric": "meteor"},
        "grader.evaluation_metric",
    ),
    (
        {"type": "text_similarity", "input": OUT, "reference": "x", "evaluation_metric": "cosine"},
        "grader.evaluation_metric",
    ),
    (
        {
            "type": "text_similarity",
            "input": OUT,
            "reference": "x",
            "evaluation_metric": "bleu",
            "pass_threshold": "hi",
        },
        "grader.pass_threshold",
    ),
    ({"type": "score_model", "model": " "}, "grader.model"),
    ({"type": "score_model", "model": "m", "range": [1, 0]}, "grader.range"),
    ({"type": "multi", "graders": {}, "calculate_output": "1"}, "grader.graders"),
    (
        {"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "a + b"},
        "grader.calculate_output",
    ),
    (
        {"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "__import__('os').system('x')"},
        "grader.calculate_output",
    ),
    (
        {"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "a.real"},
        "grader.calculate_output",
    ),
    (
        {"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "min + a"},
        "grader.calculate_output",
    ),
    (
        {"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "(" * 300 + "a" + ")" * 300},
        "grader.calculate_output",
    ),
    (
        {"type": "multi", "graders": {"a": check("eq")}, "calculate_output": "a if a else 1"},
        "grader.calculate_output",
    ),
    ({"type": "multi", "graders": {"max": check("eq")}, "calculate_output": "1"}, "grader.graders.max"),
    (
        {"type": "multi", "graders": {"a": {"type": "python"}}, "calculate_output": "a"},
        "grader.graders.a.type",
    ),
]


@pytest.mark.parametrize(("spec", "param"), BAD)
def test_graders_that_cannot_work_are_refused_naming_the_field(spec: Any, param: str) -> None:
    with pytest.raises(GraderError) as e:
        parse(spec)
    assert e.value.param == param, str(e.value)
    assert str(e.value).startswith(param + ": ")


def test_python_graders_are_refused_with_the_reason() -> None:
    with pytest.raises(GraderError, match="sandbox"):
        parse({"type": "python", "source": "x"})
