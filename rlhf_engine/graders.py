"""Graders in OpenAI's shapes: how a sampled answer is scored when the reward is a rule, a similarity,
a program or another model instead of (or besides) a trained reward model.

    string_check     1.0 when `input` and `reference` compare as `operation` says (eq, ne, like =
                     contains, ilike = contains ignoring case), else 0.0
    text_similarity  the similarity of `input` to `reference` by `evaluation_metric`: fuzzy_match
                     (rapidfuzz), bleu, gleu and meteor (nltk; meteor with WordNet 3.0, see
                     rlhf_engine/wordnet.py), rouge_1 … rouge_5 and rouge_l (rouge-score), in [0, 1];
                     cosine: the cosine of the two texts' embeddings by the server's embedding model
                     (served like a chat model: `Context.embed`), in [-1, 1]; `pass_threshold` is kept
                     for the caller
    python           the tenant's `grade(sample, item) -> float`, run in a bubblewrap sandbox
                     (`rlhf_engine.sandbox`)
    score_model      with `input` messages: a chat model we serve (a judge) is prompted and its reply's
                     number, clamped to `range` (default [0, 1]), is the score. Without `input`: a
                     reward model of ours (a value head) scores the sample directly
    label_model      a judge is prompted and its reply must be one of `labels`: 1.0 when it is one of
                     `passing_labels`, else 0.0
    multi            named graders combined by `calculate_output`, an arithmetic formula over their
                     names (+ − × / ^, min max abs floor ceil exp sqrt log) — parsed, never `eval`ed

Templates read `{{sample.output_text}}`, `{{sample.output_json.<field>}}` (the answer parsed as JSON),
`{{sample.output_tools}}` and `{{item.<field>}}` (dots reach into nested objects) from the sample and
its row. Pure Python, no torch: the API server validates and runs graders, step 3 turns their scores
into rewards. A grader that cannot work is a `GraderError` naming the field; a sample it cannot grade
(a judge's garbage, the tenant's code raising) is not an exception but a score of 0 with OpenAI's
error flag, so a bad sample never fails a training step.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rlhf_engine import sandbox, wordnet

OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = (
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)
TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
# OpenAI's /graders/run metadata.errors: what went wrong with a sample (its score is then 0)
ERROR_FLAGS = (
    "formula_parse_error",
    "sample_parse_error",
    "truncated_observation_error",
    "unresponsive_reward_error",
    "invalid_variable_error",
    "other_error",
    "python_grader_server_error",
    "python_grader_runtime_error",
    "model_grader_server_error",
    "model_grader_refusal_error",
    "model_grader_parse_error",
)
DETAILS = {  # the flags whose details OpenAI reports beside them, and the field it uses
    "python_grader_runtime_error": "python_grader_runtime_error_details",
    "python_grader_server_error": "python_grader_server_error_type",
    "model_grader_server_error": "model_grader_server_error_details",
}
ROLES = ("user", "assistant", "system", "developer")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
MAX_FORMULA = 1000
MAX_GRADERS = 32
MAX_DEPTH = 4
MAX_LABELS = 64
MAX_JUDGE_TOKENS = 4096
DEFAULT_JUDGE_TOKENS = 64
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class GraderError(ValueError):
    """A grader that cannot work, or a row it cannot read; `param` is the field to change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class _SampleError(Exception):
    """This sample cannot be graded (its flag and details): scored 0, never raised to the caller."""

    def __init__(self, flag: str, details: str = "") -> None:
        super().__init__(details)
        self.flag = flag
        self.details = details


@dataclass(frozen=True)
class Sample:
    """A model's answer as graders see it (OpenAI's `sample`)."""

    output_text: str
    output_json: Any = None  # the answer parsed, when it is a JSON object or array
    output_tools: tuple[dict[str, Any], ...] = ()

    @classmethod
    def of(cls, text: str, tools: list[dict[str, Any]] | None = None) -> Sample:
        parsed = None
        if text.lstrip()[:1] in ("{", "["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = None
        return cls(text, parsed, tuple(tools or ()))

    def as_dict(self) -> dict[str, Any]:
        """What a python grader's `grade(sample, item)` receives."""
        message = {"role": "assistant", "content": self.output_text, "tool_calls": list(self.output_tools)}
        return {
            "output_text": self.output_text,
            "output_json": self.output_json,
            "output_tools": list(self.output_tools),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }


@dataclass
class Graded:
    """One sample's grade: its score, each named part's (multi), and what went wrong (flag → details)."""

    score: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)  # judge model → its token counts
    replies: list[dict[str, Any]] = field(default_factory=list)  # what each judge answered

    @classmethod
    def failed(cls, name: str, flag: str, details: str = "") -> Graded:
        return cls(0.0, {name: 0.0}, {flag: details})


@dataclass
class JudgeReply:
    """A judge model's answer to one prompt: its text, or why there is none (`error`: a server error)."""

    text: str | None
    error: str | None = None
    refusal: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""


# (model, one message list per sample, sampling params) → one reply per message list, in order
Judge = Callable[[str, list[list[dict[str, str]]], dict[str, Any]], list[JudgeReply]]


@dataclass
class EmbedReply:
    """The embedding model's unit vectors of some texts, in order, or why there are none."""

    vectors: list[list[float]] | None
    model: str = ""
    error: str | None = None
    tokens: list[int] = field(default_factory=list)  # each text's


# texts → their embeddings by the server's embedding model
Embedder = Callable[[list[str]], EmbedReply]


@dataclass
class Context:
    """What graders that are not pure functions need, given by whoever runs them."""

    value_scores: Callable[[str], list[float]] | None = None  # a reward model's score per sample
    judge: Judge | None = None
    limits: sandbox.Limits | None = None
    embed: Embedder | None = None  # for the cosine metric


def _lookup(root: Any, path: list[str], ref: str, where: str) -> Any:
    got = root
    for part in path:
        if not isinstance(got, dict) or part not in got:
            raise GraderError(
                where,
                f"the row has no field {ref.removeprefix('item.')!r} (its fields: "
                f"{', '.join(sorted(root)) if isinstance(root, dict) else 'none'})",
            )
        got = got[part]
    return got


@dataclass(frozen=True)
class Template:
    """A string with `{{sample.*}}` and `{{item.<field>}}` references."""

    text: str
    item_fields: tuple[str, ...]

    @classmethod
    def parse(cls, text: Any, where: str) -> Template:
        if not isinstance(text, str):
            raise GraderError(
                where,
                f"must be a string (a template such as '{{{{sample.output_text}}}}'), not "
                f"{type(text).__name__}",
            )
        fields = []
        for ref in _TEMPLATE.findall(text):
            scope, _, path = ref.partition(".")
            if ref in ("sample.output_text", "sample.output_tools") or ref.startswith("sample.output_json"):
                continue
            if scope == "item" and path:
                fields.append(path)
                continue
            raise GraderError(
                where,
                f"{{{{{ref}}}}} is not a template variable; use {{{{sample.output_text}}}}, "
                "{{sample.output_json.<field>}}, {{sample.output_tools}} or {{item.<field>}}",
            )
        return cls(text, tuple(fields))

    def render(self, sample: Sample, item: dict[str, Any], where: str) -> str:
        def value(m: re.Match[str]) -> str:
            ref = m.group(1)
            if ref == "sample.output_text":
                return sample.output_text
            if ref == "sample.output_tools":
                return json.dumps(list(sample.output_tools))
            if ref.startswith("sample.output_json"):
                if sample.output_json is None:
                    raise _SampleError(
                        "sample_parse_error", "the answer is not JSON (it reads {{" + ref + "}})"
                    )
                path = ref.split(".")[2:]
                got: Any = sample.output_json
                for part in path:
                    if not isinstance(got, dict) or part not in got:
                        raise _SampleError(
                            "sample_parse_error", f"the answer's JSON has no {'.'.join(path)!r}"
                        )
                    got = got[part]
            else:
                got = _lookup(item, ref.split(".")[1:], ref, where)
            return got if isinstance(got, str) else json.dumps(got)

        return _TEMPLATE.sub(value, self.text)


@dataclass
class Grader(ABC):
    name: str
    where: str  # the field path of this grader in the request, for errors

    def grade_many(self, samples: list[Sample], items: list[dict[str, Any]], ctx: Context) -> list[Graded]:
        """Each sample's grade with its row (a batch: judges and the sandbox are called once for all)."""
        out = []
        for sample, item in zip(samples, items, strict=True):
            try:
                score = self.grade(sample, item)
            except _SampleError as e:
                out.append(Graded.failed(self.name, e.flag, e.details))
                continue
            out.append(Graded(score, {self.name: score}))
        return out

    def grade(self, sample: Sample, item: dict[str, Any]) -> float:
        """One sample's score, for graders that are pure functions of the sample and its row."""
        raise NotImplementedError

    @abstractmethod
    def item_fields(self) -> set[str]:
        """Fields of the row its templates read."""

    def parts(self) -> list[Grader]:
        """Itself, or for multi every grader inside (depth first)."""
        return [self]

    def score_models(self) -> set[str]:
        """Reward models (value heads) it scores with."""
        return {g.model for g in self.parts() if isinstance(g, ScoreModel) and g.value_head}

    def judges(self) -> list[tuple[str, str, str]]:
        """(field, model, grader type) of every chat model it prompts."""
        return [
            (f"{g.where}.model", g.model, g.kind)
            for g in self.parts()
            if isinstance(g, _Judged) and not (isinstance(g, ScoreModel) and g.value_head)
        ]

    def has_python(self) -> bool:
        return any(isinstance(g, Python) for g in self.parts())

    def embeds(self) -> list[str]:
        """The field of every part that needs the server's embedding model (cosine similarity)."""
        return [
            f"{g.where}.evaluation_metric"
            for g in self.parts()
            if isinstance(g, TextSimilarity) and g.metric == "cosine"
        ]


@dataclass
class StringCheck(Grader):
    input: Template
    reference: Template
    operation: str

    def grade(self, sample: Sample, item: dict[str, Any]) -> float:
        a = self.input.render(sample, item, f"{self.where}.input")
        b = self.reference.render(sample, item, f"{self.where}.reference")
        hit = {"eq": a == b, "ne": a != b, "like": b in a, "ilike": b.lower() in a.lower()}[self.operation]
        return 1.0 if hit else 0.0

    def item_fields(self) -> set[str]:
        return set(self.input.item_fields) | set(self.reference.item_fields)


@dataclass
class TextSimilarity(Grader):
    input: Template
    reference: Template
    metric: str
    pass_threshold: float | None = None

    def grade(self, sample: Sample, item: dict[str, Any]) -> float:
        a = self.input.render(sample, item, f"{self.where}.input")
        b = self.reference.render(sample, item, f"{self.where}.reference")
        return similarity(self.metric, a, b)

    def grade_many(self, samples: list[Sample], items: list[dict[str, Any]], ctx: Context) -> list[Graded]:
        if self.metric != "cosine":
            return super().grade_many(samples, items, ctx)
        if ctx.embed is None:
            raise GraderError(
                f"{self.where}.evaluation_metric",
                "cosine needs the server's embedding model on the inference workers, which this caller has "
                "not given",
            )
        out: list[Graded | None] = [None] * len(samples)
        pairs: dict[int, tuple[str, str]] = {}
        for i, (sample, item) in enumerate(zip(samples, items, strict=True)):
            try:
                pairs[i] = (
                    self.input.render(sample, item, f"{self.where}.input"),
                    self.reference.render(sample, item, f"{self.where}.reference"),
                )
            except _SampleError as e:
                out[i] = Graded.failed(self.name, e.flag, e.details)
        texts = sorted({t for pair in pairs.values() for t in pair if t})  # each text embedded once
        got = ctx.embed(texts) if texts else EmbedReply([])
        if got.vectors is None or len(got.vectors) != len(texts):
            why = got.error or "the embedding model gave no vectors"
            for i in pairs:
                out[i] = Graded.failed(self.name, "model_grader_server_error", why)
            return [g if g is not None else Graded.failed(self.name, "other_error") for g in out]
        index = {t: k for k, t in enumerate(texts)}
        for i, (a, b) in pairs.items():
            if not a or not b:  # an empty text has no meaning to compare
                score = 1.0 if a == b else 0.0
            else:
                va, vb = got.vectors[index[a]], got.vectors[index[b]]
                score = max(-1.0, min(1.0, sum(x * y for x, y in zip(va, vb, strict=True))))
            graded = Graded(score, {self.name: score})
            tokens = sum(got.tokens[index[t]] for t in (a, b) if t in index) if got.tokens else 0
            graded.usage = {
                got.model: {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
            }
            out[i] = graded
        return [g if g is not None else Graded.failed(self.name, "other_error") for g in out]

    def item_fields(self) -> set[str]:
        return set(self.input.item_fields) | set(self.reference.item_fields)


@dataclass
class Python(Grader):
    source: str

    def grade_many(self, samples: list[Sample], items: list[dict[str, Any]], ctx: Context) -> list[Graded]:
        outcomes = sandbox.grade(
            self.source, [(s.as_dict(), it) for s, it in zip(samples, items, strict=True)], ctx.limits
        )
        out = []
        for o in outcomes:
            if o.error is None:
                out.append(Graded(o.score, {self.name: o.score}))
            else:
                flag = "python_grader_server_error" if o.server else "python_grader_runtime_error"
                out.append(Graded.failed(self.name, flag, o.error))
        return out

    def item_fields(self) -> set[str]:
        return set()


@dataclass
class Message:
    role: str
    content: Template


@dataclass
class _Judged(Grader):
    """A grader that prompts a chat model (`model`) with `input` messages rendered for each sample."""

    model: str
    input: list[Message]
    sampling: dict[str, Any]

    kind = ""

    def item_fields(self) -> set[str]:
        return set().union(*(m.content.item_fields for m in self.input))

    def grade_many(self, samples: list[Sample], items: list[dict[str, Any]], ctx: Context) -> list[Graded]:
        if ctx.judge is None:
            raise GraderError(
                f"{self.where}.model",
                "model graders need the inference workers, which this caller has not given",
            )
        out: list[Graded | None] = [None] * len(samples)
        prompts, which = [], []
        for i, (sample, item) in enumerate(zip(samples, items, strict=True)):
            try:
                prompts.append(
                    [
                        {
                            "role": m.role,
                            "content": m.content.render(sample, item, f"{self.where}.input[{k}].content"),
                        }
                        for k, m in enumerate(self.input)
                    ]
                )
                which.append(i)
            except _SampleError as e:
                out[i] = Graded.failed(self.name, e.flag, e.details)
        replies = ctx.judge(self.model, prompts, self.sampling) if prompts else []
        for i, reply in zip(which, replies, strict=True):
            usage = {
                self.model: {
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                }
            }
            kept = [{"grader": self.name, "model": self.model, "text": reply.text, "error": reply.error}]
            if reply.error is not None or reply.text is None:
                graded = Graded.failed(self.name, "model_grader_server_error", reply.error or "no reply")
            elif reply.refusal:
                graded = Graded.failed(self.name, "model_grader_refusal_error", reply.text)
            else:
                try:
                    score = self.read(reply.text)
                    graded = Graded(score, {self.name: score})
                except _SampleError as e:
                    graded = Graded.failed(self.name, e.flag, e.details)
            graded.usage, graded.replies = usage, kept
            out[i] = graded
        return [g if g is not None else Graded.failed(self.name, "other_error") for g in out]

    @abstractmethod
    def read(self, reply: str) -> float:
        """The score a judge's reply gives; `_SampleError('model_grader_parse_error')` if none."""


def _json_result(reply: str) -> Any:
    """`result` (or `score`/`label`) of a reply that is a JSON object, else None."""
    text = reply.strip().removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if not text.startswith("{"):
        return None
    try:
        got = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(got, dict):
        for key in ("result", "score", "label"):
            if key in got:
                return got[key]
    return None


@dataclass
class ScoreModel(_Judged):
    """With `input`: a chat judge whose reply's number is the score. Without (input empty and
    `value_head`): one of our reward models scores the sample itself."""

    range: tuple[float, float] | None = None
    value_head: bool = False
    kind = "score_model"

    def item_fields(self) -> set[str]:
        return set() if self.value_head else super().item_fields()

    def grade_many(self, samples: list[Sample], items: list[dict[str, Any]], ctx: Context) -> list[Graded]:
        if not self.value_head:
            return super().grade_many(samples, items, ctx)
        if ctx.value_scores is None:
            raise GraderError(
                f"{self.where}.type",
                "a score_model grader without input scores with a reward model loaded by the trainer; it "
                "runs inside training jobs, not here (give input messages to prompt a chat model as a judge)",
            )
        scores = ctx.value_scores(self.model)
        return [Graded(s, {self.name: s}) for s in map(self.clamp, scores)]

    def clamp(self, score: float) -> float:
        low, high = self.range if self.range is not None else (-math.inf, math.inf)
        return min(max(float(score), low), high)

    def read(self, reply: str) -> float:
        got = _json_result(reply)
        if isinstance(got, int | float) and not isinstance(got, bool):
            return self.clamp(got)
        numbers = _NUMBER.findall(reply)
        if not numbers or not math.isfinite(float(numbers[0])):
            raise _SampleError("model_grader_parse_error", f"no number in the judge's reply {reply[:200]!r}")
        return self.clamp(float(numbers[0]))


@dataclass
class LabelModel(_Judged):
    labels: tuple[str, ...] = ()
    passing: tuple[str, ...] = ()
    kind = "label_model"

    def read(self, reply: str) -> float:
        label = self.label(reply)
        return 1.0 if label in self.passing else 0.0

    def label(self, reply: str) -> str:
        """The one label the reply gives: the whole reply, its JSON `result`, or the only label it names."""
        got = _json_result(reply)
        text = (got if isinstance(got, str) else reply).strip().strip(".!\"'`*").strip()
        for label in self.labels:
            if text.lower() == label.lower():
                return label
        named = {
            label
            for label in self.labels
            if re.search(rf"(?<!\w){re.escape(label.lower())}(?!\w)", text.lower())
        }
        if len(named) == 1:
            return named.pop()
        raise _SampleError(
            "model_grader_parse_error",
            f"the judge's reply {reply[:200]!r} is not one of the labels {', '.join(self.labels)}",
        )


@dataclass
class Multi(Grader):
    graders: dict[str, Grader] = field(default_factory=dict)
    formula: ast.Expression | None = None

    def grade_many(self, samples: list[Sample], items: list[dict[str, Any]], ctx: Context) -> list[Graded]:
        each = {key: g.grade_many(samples, items, ctx) for key, g in self.graders.items()}
        out = []
        for i in range(len(samples)):
            got = Graded(parts={key: results[i].score for key, results in each.items()})
            for results in each.values():
                got.errors.update(results[i].errors)
                got.replies += results[i].replies
                for model, counts in results[i].usage.items():
                    mine = got.usage.setdefault(model, dict.fromkeys(counts, 0))
                    for k, v in counts.items():
                        mine[k] = mine.get(k, 0) + v
            try:
                got.score = self.combine(got.parts)
            except _SampleError as e:
                got.errors[e.flag] = e.details
            out.append(got)
        return out

    def combine(self, scores: dict[str, float]) -> float:
        assert self.formula is not None
        try:
            value = float(_evaluate(self.formula.body, scores))
        except (ArithmeticError, ValueError, TypeError) as e:  # 1/0, log(0), (−1)^0.5 for these scores
            raise _SampleError(
                "other_error", f"calculate_output cannot be computed for scores {scores}: {e}"
            ) from None
        if not math.isfinite(value):
            raise _SampleError("other_error", f"calculate_output gives {value} for scores {scores}")
        return value

    def item_fields(self) -> set[str]:
        return set().union(*(g.item_fields() for g in self.graders.values()))

    def parts(self) -> list[Grader]:
        return [self] + [p for g in self.graders.values() for p in g.parts()]


def similarity(metric: str, a: str, b: str) -> float:
    """How similar `a` (the sample) is to `b` (the reference), in [0, 1]."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return float(fuzz.ratio(a, b)) / 100.0
    if metric in ("bleu", "gleu"):
        words, ref = a.split(), b.split()
        if not words or not ref:
            return 0.0
        if metric == "gleu":
            from nltk.translate.gleu_score import sentence_gleu

            return float(sentence_gleu([ref], words))
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        return float(sentence_bleu([ref], words, smoothing_function=SmoothingFunction().method1))
    if metric == "meteor":  # NLTK's METEOR: exact, stem and WordNet-synonym matches, fragmentation penalty
        from nltk.translate.meteor_score import meteor_score

        words, ref = a.split(), b.split()
        return float(meteor_score([ref], words, wordnet=wordnet.reader())) if words and ref else 0.0
    from rouge_score import rouge_scorer

    kind = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
    return float(rouge_scorer.RougeScorer([kind]).score(b, a)[kind].fmeasure)


def _evaluate(node: ast.AST, scores: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)
        return float(node.value)
    if isinstance(node, ast.Name):
        return scores[node.id]
    if isinstance(node, ast.UnaryOp):
        v = _evaluate(node.operand, scores)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _evaluate(node.left, scores), _evaluate(node.right, scores)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            return a / b
        return float(a**b)  # ^ and **
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    return float(FUNCTIONS[node.func.id](*(_evaluate(x, scores) for x in node.args)))


def _check_formula(text: str, names: set[str], where: str) -> ast.Expression:
    """Parse `calculate_output`; only numbers, grader names, + − × / ^ and FUNCTIONS pass."""
    if len(text) > MAX_FORMULA:
        raise GraderError(where, f"is {len(text)} characters; keep it under {MAX_FORMULA}")
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise GraderError(
            where, f"{text!r} is not an arithmetic formula (e.g. '0.5 * a + 0.5 * b')"
        ) from None
    ops = ast.Add | ast.Sub | ast.Mult | ast.Div | ast.Pow
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Expression | ast.Load | ops | ast.USub | ast.UAdd):
            continue
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ops):
            continue
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            if node.keywords or not node.args:
                raise GraderError(where, f"{node.func.id}() takes numbers only, e.g. {node.func.id}(a, b)")
            continue
        if isinstance(node, ast.Name):
            if node.id in names or (node.id in FUNCTIONS and id(node) in called):
                continue
            raise GraderError(
                where,
                f"names {node.id!r}, which is not one of its graders ({', '.join(sorted(names)) or 'none'})",
            )
        what = type(node).__name__
        raise GraderError(
            where, f"{what} is not allowed; use numbers, grader names, + - * / ^ and {', '.join(FUNCTIONS)}"
        )
    return tree


def _get(spec: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...] = str) -> Any:
    if key not in spec:
        raise GraderError(f"{where}.{key}", "required")
    value = spec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise GraderError(f"{where}.{key}", f"has the wrong type ({type(value).__name__})")
    return value


def _number(spec: dict[str, Any], key: str, where: str, low: float, high: float) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise GraderError(f"{where}.{key}", f"must be a number from {low:g} to {high:g}")
    return float(value)


def _sampling(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """A judge's `sampling_params`, checked: what the inference workers are asked for."""
    params = spec.get("sampling_params") or {}
    where = f"{where}.sampling_params"
    if not isinstance(params, dict):
        raise GraderError(where, "must be an object (temperature, top_p, seed, max_completions_tokens)")
    known = ("temperature", "top_p", "seed", "max_completions_tokens", "reasoning_effort")
    for key in params:
        if key not in known:
            raise GraderError(f"{where}.{key}", f"is not a sampling parameter; use {', '.join(known)}")
    out: dict[str, Any] = {
        "temperature": _number(params, "temperature", where, 0.0, 2.0),
        "top_p": _number(params, "top_p", where, 1e-6, 1.0),
    }
    seed = params.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise GraderError(f"{where}.seed", "must be an integer")
    out["seed"] = seed
    tokens = params.get("max_completions_tokens")
    if tokens is not None and (
        not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_JUDGE_TOKENS
    ):
        raise GraderError(
            f"{where}.max_completions_tokens", f"must be an integer from 1 to {MAX_JUDGE_TOKENS}"
        )
    out["max_completion_tokens"] = tokens or DEFAULT_JUDGE_TOKENS
    effort = params.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise GraderError(f"{where}.reasoning_effort", f"{effort!r}: choose {', '.join(REASONING_EFFORTS)}")
    return out


def parse_messages(spec: dict[str, Any], where: str) -> list[Message]:
    """A judge's `input`: messages whose content is a template, or a list of text parts."""
    given = _get(spec, "input", where, list)
    if not given or len(given) > 64:
        raise GraderError(f"{where}.input", "give 1 to 64 messages ({role, content})")
    out = []
    for k, m in enumerate(given):
        at = f"{where}.input[{k}]"
        if not isinstance(m, dict):
            raise GraderError(at, "must be a message object {role, content}")
        role = m.get("role")
        if role not in ROLES:
            raise GraderError(f"{at}.role", f"{role!r}: choose {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, dict):
            content = [content]
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if isinstance(part, str):
                    texts.append(part)
                elif (
                    isinstance(part, dict)
                    and part.get("type") in ("input_text", "output_text")
                    and isinstance(part.get("text"), str)
                ):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise GraderError(
                        f"{at}.content[{j}]",
                        f"{kind!r} is not supported: the judges we serve read text (input_text, output_text)",
                    )
            content = "".join(texts)
        out.append(
            Message("system" if role == "developer" else role, Template.parse(content, f"{at}.content"))
        )
    return out


def _python(spec: dict[str, Any], name: str, where: str) -> Python:
    source = _get(spec, "source", where)
    size = len(source.encode())
    if size > sandbox.MAX_SOURCE_BYTES:
        raise GraderError(f"{where}.source", f"is {size} bytes; keep it under {sandbox.MAX_SOURCE_BYTES}")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as e:
        line = getattr(e, "lineno", None)
        raise GraderError(
            f"{where}.source",
            f"is not valid Python ({getattr(e, 'msg', e)}{f' at line {line}' if line else ''})",
        ) from None
    grade = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "grade"]
    if not grade:
        raise GraderError(f"{where}.source", "defines no top-level function grade(sample, item) -> float")
    args = grade[-1].args
    if len(args.posonlyargs) + len(args.args) < 2 and args.vararg is None:
        raise GraderError(f"{where}.source", "grade() must take two arguments: grade(sample, item)")
    tag = spec.get("image_tag")
    if tag is not None and not isinstance(tag, str):
        raise GraderError(f"{where}.image_tag", "must be a string")
    return Python(name, where, source)


def parse(spec: Any, where: str = "grader", depth: int = 0) -> Grader:
    """A grader from its JSON form; raises GraderError naming the field for anything that cannot work."""
    if not isinstance(spec, dict):
        raise GraderError(where, f"must be an object with a type ({', '.join(TYPES)})")
    kind = spec.get("type")
    name = spec.get("name", kind)
    if not isinstance(name, str) or not name or len(name) > 128:
        raise GraderError(f"{where}.name", "must be a string of 1 to 128 characters")
    if kind == "python":
        return _python(spec, name, where)
    if kind == "string_check":
        operation = _get(spec, "operation", where)
        if operation not in OPERATIONS:
            raise GraderError(f"{where}.operation", f"{operation!r}: choose {', '.join(OPERATIONS)}")
        return StringCheck(
            name,
            where,
            Template.parse(_get(spec, "input", where), f"{where}.input"),
            Template.parse(_get(spec, "reference", where), f"{where}.reference"),
            operation,
        )
    if kind == "text_similarity":
        metric = _get(spec, "evaluation_metric", where)
        if metric not in METRICS:
            raise GraderError(f"{where}.evaluation_metric", f"{metric!r}: choose {', '.join(METRICS)}")
        if metric == "meteor" and not wordnet.available():
            raise GraderError(f"{where}.evaluation_metric", f"meteor {wordnet.missing_reason()}")
        threshold = spec.get("pass_threshold")
        if threshold is not None and (not isinstance(threshold, int | float) or isinstance(threshold, bool)):
            raise GraderError(f"{where}.pass_threshold", "must be a number")
        return TextSimilarity(
            name,
            where,
            Template.parse(_get(spec, "input", where), f"{where}.input"),
            Template.parse(_get(spec, "reference", where), f"{where}.reference"),
            metric,
            float(threshold) if threshold is not None else None,
        )
    if kind in ("score_model", "label_model"):
        model = _get(spec, "model", where)
        if not model.strip():
            raise GraderError(f"{where}.model", "must name a model of GET /v1/models")
        if kind == "score_model":
            bounds = spec.get("range")
            if bounds is not None:
                ok = (
                    isinstance(bounds, list)
                    and len(bounds) == 2
                    and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bounds)
                    and bounds[0] < bounds[1]
                )
                if not ok:
                    raise GraderError(f"{where}.range", "must be [min, max] with min < max")
            value_head = spec.get("input") is None
            if value_head:  # one of our reward models scores the sample itself
                limits = (float(bounds[0]), float(bounds[1])) if bounds else None
                return ScoreModel(name, where, model, [], {}, limits, value_head=True)
            limits = (float(bounds[0]), float(bounds[1])) if bounds else (0.0, 1.0)
            return ScoreModel(name, where, model, parse_messages(spec, where), _sampling(spec, where), limits)
        labels = _get(spec, "labels", where, list)
        passing = _get(spec, "passing_labels", where, list)
        if (
            not labels
            or len(labels) > MAX_LABELS
            or not all(isinstance(x, str) and x.strip() for x in labels)
        ):
            raise GraderError(f"{where}.labels", f"give 1 to {MAX_LABELS} labels (non-empty strings)")
        if len({x.lower() for x in labels}) != len(labels):
            raise GraderError(f"{where}.labels", "names a label twice")
        if not passing or not all(x in labels for x in passing):
            raise GraderError(
                f"{where}.passing_labels", f"give one or more of the labels ({', '.join(labels)})"
            )
        return LabelModel(
            name,
            where,
            model,
            parse_messages(spec, where),
            _sampling(spec, where),
            tuple(labels),
            tuple(passing),
        )
    if kind == "multi":
        if depth >= MAX_DEPTH:
            raise GraderError(where, f"multi graders nest at most {MAX_DEPTH} deep")
        graders = _get(spec, "graders", where, dict)
        if not graders or len(graders) > MAX_GRADERS:
            raise GraderError(f"{where}.graders", f"give 1 to {MAX_GRADERS} named graders")
        parts = {}
        for key, sub in graders.items():
            if not re.fullmatch(r"[A-Za-z_]\w*", key) or key in FUNCTIONS:
                raise GraderError(
                    f"{where}.graders.{key}",
                    "a grader's key must be a name the formula can use "
                    "(letters, digits, _; not a function name)",
                )
            parts[key] = parse(sub, f"{where}.graders.{key}", depth + 1)
        formula = _check_formula(
            _get(spec, "calculate_output", where), set(parts), f"{where}.calculate_output"
        )
        return Multi(name, where, parts, formula)
    raise GraderError(f"{where}.type", f"{kind!r}: choose {', '.join(TYPES)}")


def check_row(grader: Grader, item: dict[str, Any], where: str = "item") -> None:
    """Every field the grader's templates read is in `item` (a row), else a GraderError."""
    for path in sorted(grader.item_fields()):
        got: Any = item
        for part in path.split("."):
            if not isinstance(got, dict) or part not in got:
                raise GraderError(
                    where,
                    f"the grader reads {{{{item.{path}}}}} but the row has no field {path!r} "
                    f"(its fields: {', '.join(sorted(item)) or 'none'})",
                )
            got = got[part]


@dataclass
class Result:
    """What OpenAI's /graders/run answers: the reward, each part's score, what went wrong, how long it
    took and what the judges used."""

    reward: float
    sub_rewards: dict[str, float]
    seconds: float
    errors: dict[str, str] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    replies: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self, grader: Grader, kind: str) -> dict[str, Any]:
        errors: dict[str, Any] = {flag: flag in self.errors for flag in ERROR_FLAGS}
        for flag, key in DETAILS.items():
            errors[key] = self.errors.get(flag) or None
        judges = grader.judges()
        return {
            "reward": self.reward,
            "sub_rewards": self.sub_rewards,
            "metadata": {
                "name": grader.name,
                "type": kind,
                "errors": errors,
                "execution_time": self.seconds,
                "scores": self.sub_rewards,
                "token_usage": sum(u.get("total_tokens", 0) for u in self.usage.values())
                if self.usage
                else None,
                "sampled_model_name": judges[0][1] if len(judges) == 1 else None,
            },
            "model_grader_token_usage_per_model": self.usage,
        }


def grade_batch(
    grader: Grader, texts: list[str], items: list[dict[str, Any]], ctx: Context | None = None
) -> list[Graded]:
    """Grade answers with their rows (the trainer's and the evals' way: judges and the sandbox are
    called once per batch)."""
    return grader.grade_many([Sample.of(t) for t in texts], items, ctx or Context())


def run(grader: Grader, sample: str, item: dict[str, Any], ctx: Context | None = None) -> Result:
    """Grade one sample (OpenAI's /graders/run)."""
    started = time.monotonic()
    got = grade_batch(grader, [sample], [item], ctx)[0]
    return Result(got.score, got.parts, time.monotonic() - started, got.errors, got.usage, got.replies)


MAX_GRADER_BYTES = 1 << 20


def load(value: str, where: str = "grader") -> dict[str, Any]:
    """A grader's JSON from inline JSON (`{...}`) or a file path; parsed and checked, or a GraderError."""
    text = value
    if not value.lstrip().startswith("{"):
        try:
            with open(value, "rb") as f:
                raw = f.read(MAX_GRADER_BYTES + 1)
        except OSError as e:
            raise GraderError(
                where, f"cannot read {value!r} ({e.strerror}); pass a JSON file or inline JSON"
            ) from None
        if len(raw) > MAX_GRADER_BYTES:
            raise GraderError(where, f"{value!r} is over {MAX_GRADER_BYTES} bytes")
        text = raw.decode("utf-8", errors="replace")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise GraderError(where, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    parse(spec, where)
    return spec
