"""What every reader yields, whatever the file looked like."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
Kind = Literal["preference", "sft", "prompt", "text"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # an assistant turn's function calls: (id, name, arguments as JSON text) each; a tool turn's call id
    tool_calls: tuple[tuple[str, str, str], ...] = ()
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                for i, n, a in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Sample:
    """One row: the conversation so far (ending with a user turn) and the final answer(s).

    `rejected` is None for SFT-only rows; `chosen` is empty for prompt-only rows (step 3's prompts,
    the answers come from the actor). `line` is where the row came from (1-based; for JSON arrays the
    element index + 1) so later errors can still point at it. `item` holds the row's other fields
    (those its shape does not read): what a grader's `{{item.<field>}}` refers to.
    """

    conversation: tuple[Message, ...]
    chosen: str
    rejected: str | None = None
    line: int = 0
    item: dict[str, Any] | None = field(default=None, compare=False)
    # SFT rows of OpenAI's multi-turn format: the indices in `conversation` of the earlier assistant turns
    # that train too (each follows a user turn and has weight 1), and whether the final answer trains
    trained: tuple[int, ...] = ()
    answer_trained: bool = True
    # OpenAI's function-calling rows: the tools offered (as given) and the final answer's calls
    tools: tuple[dict[str, Any], ...] = field(default=(), compare=False)
    answer_calls: tuple[tuple[str, str, str], ...] = ()

    @property
    def answer(self) -> str | Message:
        """The final answer as the formatter takes it (a message when it calls tools)."""
        return Message("assistant", self.chosen, self.answer_calls) if self.answer_calls else self.chosen

    @property
    def prompt_text(self) -> str:
        """The last user message (what a single-turn question is about)."""
        return next(m.content for m in reversed(self.conversation) if m.role == "user")


@dataclass
class Dataset:
    """A dataset read from one source.

    Conversation datasets fill `rows` (kind `preference`, `sft` or `prompt`); plain text fills `texts`.
    `eval_rows` holds a source's own evaluation split when it has one (a `datasets` directory with a
    `test` split); otherwise evaluation rows are carved from `rows` by the splitter.
    """

    name: str
    kind: Kind
    fingerprint: str  # content hash of the source files
    format: str  # the detected shape, for previews and errors
    rows: list[Sample]
    eval_rows: list[Sample] | None = None
    texts: list[str] | None = None
    filtered: dict[str, int] = field(default_factory=dict)  # rows left out at read time, by reason

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.rows)
