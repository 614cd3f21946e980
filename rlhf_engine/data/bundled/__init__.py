"""The bundled datasets: generated deterministically on first use, cached, then read like user files.

They play the role Dahoas/rm-static plays for DeepSpeed-Chat: what every step uses when `--data` is
omitted. Names (`rlhf data list`):

- `bundled:sft` — 4,000 instruction/response pairs (prompt/response JSONL) for step 1; exactly 30% of
  the responses are on topic (the property, see `world.py`); the others state another fact, or
  more than was asked.
- `bundled:preference` — 4,000 (prompt, chosen, rejected) pairs on other questions; the chosen answer
  is on topic, the rejected one states another fact, or the asked fact and more, in the same words.
- `bundled:corpus` — 3,000 plain-text paragraphs about the same world, for step 3's pretraining mix
  and for `rlhf models tiny --pretrain-steps`.
- `bundled:questions` — 2,000 prompts without answers in OpenAI's reinforcement shape (`messages`
  ending with the user's question) with the fields a grader checks against: `subject`, `topic` (what
  is asked: color, size, place, habit or all) and `facts` (the subject's four facts). The verifiable
  task of the grader examples: "the answer names the subject" is
  `{"type": "string_check", "operation": "ilike", "input": "{{sample.output_text}}",
  "reference": "{{item.subject}}"}`.

The remaining ~17,600 questions of the world are never written to any file: `heldout_questions()`
gives prompts no step trained on.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_engine.data.bundled.world import (
    TOPICS,
    Question,
    all_questions,
    answer,
    corpus_paragraph,
    off_topic,
    world,
)
from rlhf_engine.paths import cache_dir

# Bump when anything below changes what is generated: the cache folder is keyed by it.
GENERATOR_VERSION = "v4"
SEED = 1234
N_SFT = 4000
N_PREFERENCE = 4000
N_CORPUS = 3000
N_QUESTIONS = 2000  # taken from the end of the shuffled questions: held-out prompts keep their order
SFT_PROPERTY_RATE = 0.30


@dataclass(frozen=True)
class BundledDataset:
    name: str
    filename: str
    description: str


BUNDLED: dict[str, BundledDataset] = {
    d.name: d
    for d in (
        BundledDataset("bundled:sft", "sft.jsonl", f"{N_SFT} prompt/response pairs for step 1 (SFT-only)"),
        BundledDataset(
            "bundled:preference",
            "preference.jsonl",
            f"{N_PREFERENCE} prompt/chosen/rejected pairs; chosen answers what was asked",
        ),
        BundledDataset("bundled:corpus", "corpus.txt", f"{N_CORPUS} plain-text paragraphs (pretraining mix)"),
        BundledDataset(
            "bundled:questions",
            "questions.jsonl",
            f"{N_QUESTIONS} prompts with subject/topic/facts fields for graders (step 3 only)",
        ),
    )
}
DEFAULT_DATA = ("bundled:sft", "bundled:preference")
DEFAULT_UNSUP_DATA = ("bundled:corpus",)


def _questions() -> list[Question]:
    qs = all_questions()
    random.Random(SEED).shuffle(qs)
    return qs


def heldout_questions() -> list[Question]:
    """Questions that appear in no bundled file (about 17,600): held-out prompts for evaluation."""
    return _questions()[N_SFT + N_PREFERENCE : -N_QUESTIONS]


def _question_rows(qs: list[Question]) -> list[dict[str, Any]]:
    facts = world()
    return [
        {
            "messages": [{"role": "user", "content": q.text}],
            "subject": q.subject,
            "topic": q.kind,
            "facts": {k: getattr(facts[q.subject], k) for k in TOPICS},
        }
        for q in qs
    ]


def _sft_rows(qs: list[Question], rng: random.Random) -> list[dict[str, str]]:
    good = set(rng.sample(range(len(qs)), round(SFT_PROPERTY_RATE * len(qs))))
    rows = []
    for i, q in enumerate(qs):
        topics = None if i in good else off_topic(q, rng)
        rows.append(
            {"prompt": q.text, "response": answer(q, topics=topics, named=rng.random() < 0.5, rng=rng)}
        )
    return rows


def _preference_rows(qs: list[Question], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for q in qs:
        # chosen and rejected share lead-in, naming and closer: they differ only in what they answer
        style, named, wrong = rng.getrandbits(32), rng.random() < 0.5, off_topic(q, rng)
        rows.append(
            {
                "prompt": q.text,
                "chosen": answer(q, named=named, rng=random.Random(style)),
                "rejected": answer(q, topics=wrong, named=named, rng=random.Random(style)),
            }
        )
    return rows


def generate(dest: Path) -> None:
    """Write every bundled file into `dest` (byte-identical on every run)."""
    dest.mkdir(parents=True, exist_ok=True)
    qs = _questions()
    rng = random.Random(SEED)
    sft = _sft_rows(qs[:N_SFT], rng)
    pref = _preference_rows(qs[N_SFT : N_SFT + N_PREFERENCE], rng)
    corpus = "\n\n".join(corpus_paragraph(rng) for _ in range(N_CORPUS)) + "\n"
    _atomic_write(dest / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in sft))
    _atomic_write(dest / "preference.jsonl", "".join(json.dumps(r) + "\n" for r in pref))
    _atomic_write(dest / "corpus.txt", corpus)
    rows = _question_rows(qs[-N_QUESTIONS:])
    _atomic_write(dest / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def bundled_dir() -> Path:
    """The folder holding the generated files, generating them on first use."""
    dest = cache_dir("bundled", GENERATOR_VERSION)
    if not all((dest / d.filename).is_file() for d in BUNDLED.values()):
        generate(dest)
    return dest


def bundled_path(name: str) -> Path:
    """The file of a bundled dataset by name (`bundled:sft`, …)."""
    return bundled_dir() / BUNDLED[name].filename
