"""Graders in OpenAI's shapes: how a sampled answer is scored when the reward is a rule, a similarity
or another model instead of (or besides) a trained reward model.

    string_check     1.0 when `input` and `reference` compare as `operation` says (eq, ne, like =
                     contains, ilike = contains ignoring case), else 0.0
    text_similarity  the similarity of `input` to `reference` by `evaluation_metric`: fuzzy_match
                     (rapidfuzz), bleu and gleu (nltk), rouge_1 … rouge_5 and rouge_l (rouge-score),
                     in [0, 1]; `pass_threshold` is kept for the caller
    score_model      a reward model of ours scores the sample (`model`: a run's step-2 model or an
                     uploaded one), clamped to `range` when given; the caller supplies the scorer
    multi            named graders combined by `calculate_output`, an arithmetic formula over their
                     names (+ − × / ^, min max abs floor ceil exp sqrt log) — parsed, never `eval`ed
    python           refused: running a tenant's code needs a sandbox this service does not have

Templates read `{{sample.output_text}}` and `{{item.<field>}}` (dots reach into nested objects) from
the sample and its training row. Pure Python, no torch: the API server validates and runs graders,
step 3 turns their scores into rewards. Every error is a `GraderError` that names the field.
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

Scorer = Callable[[str, str, dict[str, Any]], float]  # (model, sample text, item) → score

OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
UNAVAILABLE_METRICS = {
    "meteor": "needs the WordNet corpus, which this server cannot download",
    "cosine": "needs an embedding model, which this server does not run for graders",
}
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
# OpenAI's /graders/run metadata.errors: flags of what went wrong (here an error is a 400 instead)
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
MAX_FORMULA = 1000
MAX_GRADERS = 32
MAX_DEPTH = 4
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][\w.]*)\s*\}\}")


class GraderError(ValueError):
    """A grader that cannot work, or a sample it cannot grade; `param` is the field to change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class Template:
    """A string with `{{sample.output_text}}` and `{{item.<field>}}` references."""

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
            if ref == "sample.output_text":
                continue
            if scope == "item" and path:
                fields.append(path)
                continue
            raise GraderError(
                where,
                f"{{{{{ref}}}}} is not a template variable; use {{{{sample.output_text}}}} or "
                "{{item.<field>}}",
            )
        return cls(text, tuple(fields))

    def render(self, sample: str, item: dict[str, Any], where: str) -> str:
        def value(m: re.Match[str]) -> str:
            ref = m.group(1)
            if ref == "sample.output_text":
                return sample
            got: Any = item
            for part in ref.split(".")[1:]:
                if not isinstance(got, dict) or part not in got:
                    raise GraderError(
                        where,
                        f"the row has no field {ref.removeprefix('item.')!r} (its fields: "
                        f"{', '.join(sorted(item)) or 'none'})",
                    )
                got = got[part]
            return got if isinstance(got, str) else json.dumps(got)

        return _TEMPLATE.sub(value, self.text)


@dataclass
class Grader(ABC):
    name: str
    where: str  # the field path of this grader in the request, for errors

    @abstractmethod
    def grade(self, sample: str, item: dict[str, Any], scorer: Scorer | None) -> float:
        """The score of `sample` (the model's answer) for training row `item`."""

    @abstractmethod
    def item_fields(self) -> set[str]:
        """Fields of the training row its templates read."""

    def score_models(self) -> set[str]:
        """Reward models it needs to score with."""
        return set()

    def sub_scores(self, sample: str, item: dict[str, Any], scorer: Scorer | None) -> dict[str, float]:
        """Each named part's score (multi: its graders; others: itself)."""
        return {self.name: self.grade(sample, item, scorer)}

    def combine(self, scores: dict[str, float]) -> float:
        """The reward from `sub_scores` (multi: its formula; others: their own score)."""
        return scores[self.name]


@dataclass
class StringCheck(Grader):
    input: Template
    reference: Template
    operation: str

    def grade(self, sample: str, item: dict[str, Any], scorer: Scorer | None) -> float:
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

    def grade(self, sample: str, item: dict[str, Any], scorer: Scorer | None) -> float:
        a = self.input.render(sample, item, f"{self.where}.input")
        b = self.reference.render(sample, item, f"{self.where}.reference")
        return similarity(self.metric, a, b)

    def item_fields(self) -> set[str]:
        return set(self.input.item_fields) | set(self.reference.item_fields)


@dataclass
class ScoreModel(Grader):
    model: str
    range: tuple[float, float] | None = None

    def grade(self, sample: str, item: dict[str, Any], scorer: Scorer | None) -> float:
        if scorer is None:
            raise GraderError(
                f"{self.where}.type",
                "score_model graders need the reward model loaded; they run inside training jobs, not here",
            )
        score = float(scorer(self.model, sample, item))
        if self.range is not None:
            score = min(max(score, self.range[0]), self.range[1])
        return score

    def item_fields(self) -> set[str]:
        return set()

    def score_models(self) -> set[str]:
        return {self.model}


@dataclass
class Multi(Grader):
    graders: dict[str, Grader] = field(default_factory=dict)
    formula: ast.Expression | None = None

    def grade(self, sample: str, item: dict[str, Any], scorer: Scorer | None) -> float:
        return self.combine(self.sub_scores(sample, item, scorer))

    def sub_scores(self, sample: str, item: dict[str, Any], scorer: Scorer | None) -> dict[str, float]:
        return {name: g.grade(sample, item, scorer) for name, g in self.graders.items()}

    def combine(self, scores: dict[str, float]) -> float:
        assert self.formula is not None
        try:
            value = float(_evaluate(self.formula.body, scores))
        except (ArithmeticError, ValueError, TypeError) as e:  # 1/0, log(0), (−1)^0.5 for these scores
            raise GraderError(
                f"{self.where}.calculate_output", f"cannot be computed for scores {scores}: {e}"
            ) from None
        if not math.isfinite(value):
            raise GraderError(f"{self.where}.calculate_output", f"gives {value} for scores {scores}")
        return value

    def item_fields(self) -> set[str]:
        return set().union(*(g.item_fields() for g in self.graders.values()))

    def score_models(self) -> set[str]:
        return set().union(*(g.score_models() for g in self.graders.values()))


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


def parse(spec: Any, where: str = "grader", depth: int = 0) -> Grader:
    """A grader from its JSON form; raises GraderError naming the field for anything that cannot work."""
    if not isinstance(spec, dict):
        raise GraderError(
            where, "must be an object with a type (string_check, text_similarity, score_model or multi)"
        )
    kind = spec.get("type")
    name = spec.get("name", kind)
    if not isinstance(name, str) or not name or len(name) > 128:
        raise GraderError(f"{where}.name", "must be a string of 1 to 128 characters")
    if kind == "python":
        raise GraderError(
            f"{where}.type",
            "python graders run the tenant's code, which needs a sandbox this "
            "server does not have; express the check as string_check, "
            "text_similarity or multi",
        )
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
        if metric in UNAVAILABLE_METRICS:
            raise GraderError(
                f"{where}.evaluation_metric",
                f"{metric} {UNAVAILABLE_METRICS[metric]}; choose one of {', '.join(METRICS)}",
            )
        if metric not in METRICS:
            raise GraderError(f"{where}.evaluation_metric", f"{metric!r}: choose {', '.join(METRICS)}")
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
    if kind == "score_model":
        model = _get(spec, "model", where)
        if not model.strip():
            raise GraderError(
                f"{where}.model", "must name a reward model (a run's step2_reward or an uploaded one)"
            )
        bounds = spec.get("range")
        if bounds is not None:
            ok = (
                isinstance(bounds, list)
                and len(bounds) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bounds)
                and bounds[0] < bounds[1]
            )
            if not ok:
                raise GraderError(f"{where}.range", "must be [low, high] with low < high")
        return ScoreModel(name, where, model, (float(bounds[0]), float(bounds[1])) if bounds else None)
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
    raise GraderError(
        f"{where}.type", f"{kind!r}: choose string_check, text_similarity, score_model or multi"
    )


def check_row(grader: Grader, item: dict[str, Any], where: str = "item") -> None:
    """Every field the grader's templates read is in `item` (a training row), else a GraderError."""
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
    """What OpenAI's /graders/run answers: the reward, each part's score, and how long it took."""

    reward: float
    sub_rewards: dict[str, float]
    seconds: float

    def as_dict(self, grader: Grader, kind: str) -> dict[str, Any]:
        return {
            "reward": self.reward,
            "sub_rewards": self.sub_rewards,
            "metadata": {
                "name": grader.name,
                "type": kind,
                "errors": dict.fromkeys(ERROR_FLAGS, False),
                "execution_time": self.seconds,
                "scores": self.sub_rewards,
                "token_usage": None,
                "sampled_model_name": None,
            },
            "model_grader_token_usage_per_model": {},
        }


def run(grader: Grader, sample: str, item: dict[str, Any], scorer: Scorer | None = None) -> Result:
    """Grade one sample; a multi grader's parts are scored once and combined."""
    started = time.monotonic()
    parts = grader.sub_scores(sample, item, scorer)
    reward = grader.combine(parts)
    return Result(reward, parts, time.monotonic() - started)


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
