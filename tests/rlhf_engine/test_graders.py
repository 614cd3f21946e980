"""Graders in OpenAI's shapes: each type's score worked out by hand, templates over the sample and the
row, safe formulas, and every way a grader can be wrong refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from rlhf_engine.graders import (
    Context,
    EmbedReply,
    GraderError,
    JudgeReply,
    Multi,
    check_row,
    grade_batch,
    parse,
    run,
    similarity,
)

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
        parse(check("eq", "{{sample.output}}"))
    assert e.value.param == "grader.reference"


def test_templates_read_the_answer_as_json_and_flag_an_answer_that_is_not() -> None:
    g = parse(check("eq", "{{sample.output_json.city}}"))
    assert run(g, '{"city": "Oslo"}', {}).reward == 0.0  # input is the whole text, not "Oslo"
    city = parse({**check("eq", "{{item.answer}}"), "input": "{{sample.output_json.city}}"})
    assert run(city, '{"city": "Oslo", "n": 1}', {"answer": "Oslo"}).reward == 1.0
    nested = parse({**check("eq", "[1, 2]"), "input": "{{sample.output_json.a.b}}"})
    assert run(nested, '{"a": {"b": [1, 2]}}', {}).reward == 1.0
    for answer, says in (("Oslo", "not JSON"), ('{"town": "Oslo"}', "no 'city'")):
        out = run(city, answer, {"answer": "Oslo"})
        assert (
            out.reward == 0.0
            and list(out.errors) == ["sample_parse_error"]
            and says in out.errors["sample_parse_error"]
        )
    tools = parse({**check("like", "[]"), "input": "{{sample.output_tools}}"})
    assert run(tools, "no tools", {}).reward == 1.0


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
    # meteor is NLTK's on WordNet 3.0: its docstring's example gives 0.6944 (round to 4 places)
    hypothesis = (
        "It is a guide to action which ensures that the military always obeys the commands of the party"
    )
    reference = "It is a guide to action that ensures that the military will forever heed Party commands"
    assert round(similarity("meteor", hypothesis, reference), 4) == 0.6944
    # 3 of 3 words matched in one chunk: F-mean 1 and a penalty of 0.5 · (1/3)³ → 1 − 1/54
    assert similarity("meteor", "the cat sat", "the cat sat") == pytest.approx(1 - 1 / 54)
    # "dogs" matches "dog" by its stem, "hound" matches "dog" through a WordNet synset (dog.n.01)
    assert similarity("meteor", "dogs bark", "dog bark") > 0.9 and similarity("meteor", "hound", "dog") > 0.4
    assert similarity("meteor", "", "the cat") == 0.0
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


def _letters(texts: list[str]) -> EmbedReply:
    """An embedder for the grader's arithmetic: letter counts, normalised (the served model's vectors are
    checked against transformers in tests/rlhf_engine/chat/test_embed.py and tests/service/test_judges.py)."""
    out = []
    for t in texts:
        v = [float(t.lower().count(c)) for c in "abcdefghijklmnopqrstuvwxyz"]
        norm = sum(x * x for x in v) ** 0.5 or 1.0
        out.append([x / norm for x in v])
    return EmbedReply(out, model="letters", tokens=[len(t.split()) for t in texts])


def test_cosine_embeds_each_distinct_text_once_and_flags_an_embedder_that_fails() -> None:
    g = parse(
        {
            "type": "text_similarity",
            "name": "sim",
            "input": OUT,
            "reference": "{{item.answer}}",
            "evaluation_metric": "cosine",
        }
    )
    assert g.embeds() == ["grader.evaluation_metric"] and not g.judges()
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> EmbedReply:
        calls.append(texts)
        return _letters(texts)

    items = [{"answer": "ab"}, {"answer": "ab"}, {"answer": "ab"}]
    out = grade_batch(g, ["ab", "ba", "zz"], items, Context(embed=embed))
    assert [o.score for o in out] == pytest.approx([1.0, 1.0, 0.0])
    assert calls == [["ab", "ba", "zz"]]  # one call, each distinct text once
    assert out[2].usage == {"letters": {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}}
    failed = grade_batch(
        g, ["ab"], items[:1], Context(embed=lambda t: EmbedReply(None, error="no_worker: none"))
    )
    assert failed[0].score == 0.0 and failed[0].errors == {"model_grader_server_error": "no_worker: none"}
    with pytest.raises(GraderError) as e:  # outside the service there is no embedding model to ask
        grade_batch(g, ["ab"], items[:1])
    assert e.value.param == "grader.evaluation_metric"


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
    out = run(zero, "Rome", {"answer": "Paris"})  # 1/0 for this sample: flagged and 0, not an exception
    assert (
        out.reward == 0.0
        and out.sub_rewards == {"a": 0.0}
        and "division by zero" in out.errors["other_error"]
    )
    assert run(zero, "Paris", {"answer": "Paris"}).reward == 1.0


def test_score_model_without_input_scores_with_a_reward_model_clamped_to_its_range() -> None:
    g = parse({"type": "score_model", "name": "rm", "model": "ft:tiny:x:job-1", "range": [-1, 1]})
    assert g.score_models() == {"ft:tiny:x:job-1"} and g.judges() == []
    seen = []

    def scores(model: str) -> list[float]:
        seen.append(model)
        return [3.5, -0.25]

    out = grade_batch(g, ["an answer", "another"], [{}, {}], Context(value_scores=scores))
    assert [o.score for o in out] == [1.0, -0.25] and seen == ["ft:tiny:x:job-1"]
    with pytest.raises(GraderError, match="inside training jobs"):
        run(g, "an answer", {})
    inside = parse(
        {"type": "multi", "graders": {"rm": {"type": "score_model", "model": "m"}}, "calculate_output": "rm"}
    )
    assert inside.score_models() == {"m"} and inside.judges() == []  # a reward model is no judge


JUDGE_INPUT = [
    {"role": "system", "content": "Grade the answer from 0 to 10."},
    {
        "role": "user",
        "content": [{"type": "input_text", "text": "Q: {{item.question}}\nA: {{sample.output_text}}"}],
    },
]


class FakeJudge:
    """A stand-in for the inference workers' reply (the real path is tests/service/test_judges.py): it
    records what the grader sent and answers from a script."""

    def __init__(self, *replies: JudgeReply) -> None:
        self.replies, self.calls = list(replies), []  # type: ignore[var-annotated]

    def __call__(
        self, model: str, prompts: list[list[dict[str, str]]], sampling: dict[str, Any]
    ) -> list[JudgeReply]:
        self.calls.append((model, prompts, sampling))
        return [self.replies.pop(0) for _ in prompts]


def test_score_model_judges_prompt_with_rendered_messages_and_parse_a_number() -> None:
    g = parse(
        {
            "type": "score_model",
            "name": "judge",
            "model": "tiny-opt-xs",
            "input": JUDGE_INPUT,
            "range": [0, 10],
            "sampling_params": {
                "temperature": 0,
                "seed": 7,
                "max_completions_tokens": 8,
                "reasoning_effort": "low",
            },
        }
    )
    assert g.judges() == [("grader.model", "tiny-opt-xs", "score_model")] and g.item_fields() == {"question"}
    judge = FakeJudge(
        JudgeReply("7", prompt_tokens=20, completion_tokens=1),
        JudgeReply('{"result": 12.5}'),  # clamped to the range
        JudgeReply("Score: 3/10 because"),  # the first number
        JudgeReply("no idea"),
        JudgeReply(None, error="busy: every inference worker is at capacity"),
    )
    items = [{"question": "Capital of France?"}] * 5
    out = grade_batch(g, ["Paris", "a", "b", "c", "d"], items, Context(judge=judge))
    assert [o.score for o in out] == [7.0, 10.0, 3.0, 0.0, 0.0]
    assert out[0].usage == {"tiny-opt-xs": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}}
    assert list(out[3].errors) == ["model_grader_parse_error"]
    assert out[4].errors == {"model_grader_server_error": "busy: every inference worker is at capacity"}
    assert out[0].replies == [{"grader": "judge", "model": "tiny-opt-xs", "text": "7", "error": None}]
    ((model, prompts, sampling),) = judge.calls  # one call for the batch
    assert model == "tiny-opt-xs" and len(prompts) == 5
    assert prompts[0] == [
        {"role": "system", "content": "Grade the answer from 0 to 10."},
        {"role": "user", "content": "Q: Capital of France?\nA: Paris"},
    ]
    assert sampling == {"temperature": 0.0, "top_p": None, "seed": 7, "max_completion_tokens": 8}
    default = parse({"type": "score_model", "model": "m", "input": JUDGE_INPUT})  # range [0, 1] by default
    assert (
        grade_batch(default, ["x"], [{"question": "?"}], Context(judge=FakeJudge(JudgeReply("0.5 or 5"))))[
            0
        ].score
        == 0.5
    )
    assert run(default, "x", {"question": "?"}, Context(judge=FakeJudge(JudgeReply("5")))).reward == 1.0


def test_label_model_judges_pass_on_the_passing_labels() -> None:
    g = parse(
        {
            "type": "label_model",
            "name": "names it",
            "model": "judge-model",
            "input": [
                {"role": "user", "content": "Does '{{sample.output_text}}' name {{item.subject}}? yes or no"}
            ],
            "labels": ["yes", "no"],
            "passing_labels": ["yes"],
        }
    )
    replies = ["yes", " No.", '{"result": "yes"}', "I would say yes here", "yes and no", "maybe"]
    out = grade_batch(
        g,
        ["a"] * len(replies),
        [{"subject": "Paris"}] * len(replies),
        Context(judge=FakeJudge(*map(JudgeReply, replies))),
    )
    assert [o.score for o in out] == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert [list(o.errors) for o in out[4:]] == [["model_grader_parse_error"]] * 2
    with pytest.raises(GraderError, match="the inference workers"):
        run(g, "a", {"subject": "Paris"})  # no judge given: the caller has no workers


def test_multi_combines_judges_and_flags_what_its_parts_could_not_grade() -> None:
    g = parse(
        {
            "type": "multi",
            "graders": {
                "exact": check("ilike"),
                "judge": {"type": "score_model", "model": "m", "input": JUDGE_INPUT, "range": [0, 10]},
            },
            "calculate_output": "0.5 * exact + 0.05 * judge",
        }
    )
    judge = FakeJudge(JudgeReply("10", prompt_tokens=5, completion_tokens=1), JudgeReply("??"))
    out = grade_batch(g, ["paris", "rome"], [{"answer": "Paris", "question": "?"}] * 2, Context(judge=judge))
    assert out[0].score == pytest.approx(1.0) and out[0].parts == {"exact": 1.0, "judge": 10.0}
    assert out[0].usage == {"m": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
    assert out[1].score == 0.0 and list(out[1].errors) == ["model_grader_parse_error"]


BAD = [
    ("not an object", "grader"),
    ({"type": "python", "source": "def grade(s, i) return 1"}, "grader.source"),
    ({"type": "python", "source": "def score(s, i): return 1"}, "grader.source"),
    ({"type": "python", "source": "def grade(s): return 1"}, "grader.source"),
    ({"type": "python", "source": "x = 1\n" * 50_000}, "grader.source"),
    ({"type": "python", "source": 5}, "grader.source"),
    (
        {"type": "label_model", "model": "m", "input": JUDGE_INPUT, "labels": [], "passing_labels": []},
        "grader.labels",
    ),
    (
        {
            "type": "label_model",
            "model": "m",
            "input": JUDGE_INPUT,
            "labels": ["a", "A"],
            "passing_labels": ["a"],
        },
        "grader.labels",
    ),
    (
        {
            "type": "label_model",
            "model": "m",
            "input": JUDGE_INPUT,
            "labels": ["a", "b"],
            "passing_labels": ["c"],
        },
        "grader.passing_labels",
    ),
    ({"type": "label_model", "model": "m", "labels": ["a"], "passing_labels": ["a"]}, "grader.input"),
    ({"type": "score_model", "model": "m", "input": []}, "grader.input"),
    (
        {"type": "score_model", "model": "m", "input": [{"role": "tool", "content": "x"}]},
        "grader.input[0].role",
    ),
    (
        {
            "type": "score_model",
            "model": "m",
            "input": [{"role": "user", "content": [{"type": "input_image"}]}],
        },
        "grader.input[0].content[0]",
    ),
    (
        {"type": "score_model", "model": "m", "input": [{"role": "user", "content": "{{item}}"}]},
        "grader.input[0].content",
    ),
    (
        {"type": "score_model", "model": "m", "input": JUDGE_INPUT, "sampling_params": {"temperature": 3}},
        "grader.sampling_params.temperature",
    ),
    (
        {
            "type": "score_model",
            "model": "m",
            "input": JUDGE_INPUT,
            "sampling_params": {"max_completions_tokens": 0},
        },
        "grader.sampling_params.max_completions_tokens",
    ),
    (
        {"type": "score_model", "model": "m", "input": JUDGE_INPUT, "sampling_params": {"logprobs": True}},
        "grader.sampling_params.logprobs",
    ),
    ({"type": "regex"}, "grader.type"),
    ({**check("eq"), "operation": "startswith"}, "grader.operation"),
    ({"type": "string_check", "input": OUT, "operation": "eq"}, "grader.reference"),
    ({**check("eq"), "input": 5}, "grader.input"),
    (
        {"type": "text_similarity", "input": OUT, "reference": "x", "evaluation_metric": "cosine_distance"},
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
    ({"type": "score_model", "model": "m", "input": JUDGE_INPUT, "range": [1, 1]}, "grader.range"),
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
        "grader.graders.a.source",
    ),
]


@pytest.mark.parametrize(("spec", "param"), BAD)
def test_graders_that_cannot_work_are_refused_naming_the_field(spec: Any, param: str) -> None:
    with pytest.raises(GraderError) as e:
        parse(spec)
    assert e.value.param == param, str(e.value)
    assert str(e.value).startswith(param + ": ")
