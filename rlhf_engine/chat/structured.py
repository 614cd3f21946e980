"""Structured outputs: a reply constrained to a JSON schema (OpenAI's `response_format`) by masking, at
every decode step, the tokens the schema does not allow next.

The grammar engine is llguidance (Microsoft's; the engine behind OpenAI's own Structured Outputs): a
Rust library with no torch or CUDA dependency, so the same code masks on CPU and GPU, compiles a schema
lazily in milliseconds (no per-schema build step) and computes a 49k-token mask in tens of microseconds.
`docs/chat.md#structured-outputs` has the measurements.

`grammar_of` turns `response_format` into a grammar and checks it without a tokenizer (the API does
this before routing: a schema the engine cannot compile is a 400 naming the field); `Constraint` is one
reply's matcher in the chat generator's batch — rows with and without one decode together, each row
masking its own logits."""

from __future__ import annotations

import functools
import json
from typing import Any

from rlhf_engine.chat.errors import ChatRequestError

# the compiler's options: no free whitespace between tokens (a model cannot pad a reply with spaces
# until it runs out of tokens), as OpenAI's strict mode writes JSON
_COMPILE = {"whitespace_flexible": False}
MAX_SCHEMA_BYTES = 64 * 1024


def grammar_of(response_format: dict[str, Any] | None, where: str = "response_format") -> str | None:
    """The llguidance grammar of an OpenAI `response_format` (None for plain text), checked: a
    `ChatRequestError` naming the field when the schema cannot be compiled."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
        param = where
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ChatRequestError(
                f"{where}.json_schema: give {{name, schema, strict}} (name is required)",
                param=f"{where}.json_schema",
            )
        schema = spec.get("schema", {"type": "object"})
        param = f"{where}.json_schema.schema"
        if not isinstance(schema, dict):
            raise ChatRequestError(f"{param}: must be a JSON schema object", param=param)
    else:
        raise ChatRequestError(
            f"{where}.type: {kind!r} is not one of text, json_object, json_schema", param=f"{where}.type"
        )
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise ChatRequestError(f"{param}: the schema is over {MAX_SCHEMA_BYTES} bytes", param=param)
    from llguidance import LLMatcher

    grammar = LLMatcher.grammar_from_json_schema(text, overrides=_COMPILE)  # type: ignore[arg-type]
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ChatRequestError(f"{param}: the schema cannot be compiled: {messages[0]}", param=param)
    return grammar


class Vocabulary:
    """A model's tokenizer as the grammar engine sees it, as wide as the model's logits (made once per
    loaded model)."""

    def __init__(self, tokenizer: Any, model: Any, eos_ids: set[int]) -> None:
        import llguidance.hf

        head = model.get_output_embeddings()
        self.size = int(head.weight.shape[0]) if head is not None else len(tokenizer)
        eos = sorted(eos_ids) or None
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.size, eos_token=eos)


@functools.cache
def _shifts() -> Any:
    """0…31 as int32: the bit positions of one word of a token bitmask."""
    import torch

    return torch.arange(32, dtype=torch.int32)


class Constraint:
    """One reply's grammar: masks its logits before each token is chosen and follows the chosen token."""

    def __init__(self, vocabulary: Vocabulary, grammar: str) -> None:
        import llguidance
        import torch

        self.matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise ChatRequestError(
                f"response_format: the schema cannot be used: {self.matcher.get_error()}",
                param="response_format",
            )
        self._bitmask = torch.full((1, (vocabulary.size + 31) // 32), -1, dtype=torch.int32)

    def mask(self, logits: Any) -> Any:
        """`logits` (V,) with every token the grammar forbids next at -inf (a copy). The bits are
        unpacked with plain tensor ops: llguidance's own helper is a `torch.compile`d kernel, which would
        compile C++ on a worker's first structured request (and importing it loads torch's compiler)."""
        words = self._bitmask[0]  # llguidance.torch's fill, without importing its compiled kernels
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        allowed = ((words.unsqueeze(1) >> _shifts()) & 1).flatten()[: logits.shape[-1]].bool()
        out = logits.float().clone()
        out[~allowed.to(out.device)] = float("-inf")
        return out

    def follow(self, token: int) -> None:
        if not self.matcher.consume_token(token):  # cannot happen with the mask applied: say so loudly
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The reply is complete: nothing but the end may follow."""
        return bool(self.matcher.is_stopped())


class GrammarProcessor:
    """A transformers `LogitsProcessor` for `generate`: every row of the batch sampled under the grammar
    (step 3's answers under a reinforcement job's `response_format`). A row whose reply is complete gets
    only the end-of-sequence token."""

    def __init__(self, vocabulary: Vocabulary, grammar: str, rows: int, eos_id: int) -> None:
        self.constraints = [Constraint(vocabulary, grammar) for _ in range(rows)]
        self.eos_id = eos_id
        self._started = False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self._started:  # the token each row was given last time
            for row, c in enumerate(self.constraints):
                if not c.done:
                    c.follow(int(input_ids[row, -1]))
        self._started = True
        scores = scores.clone()  # generate keeps the tensor it passed in as the step's raw logits
        for row, c in enumerate(self.constraints):
            if c.done:
                scores[row] = float("-inf")
                scores[row, self.eos_id] = 0.0
            else:
                scores[row] = c.mask(scores[row]).to(scores.dtype)
        return scores
