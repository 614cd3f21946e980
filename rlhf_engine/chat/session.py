"""A multi-turn conversation over the chat generator: the history the terminal chat keeps.

Each turn renders the whole history through the shared formatter (docs/contracts.md §2). When the
history no longer fits the model's context with room for the reply, the oldest turns are dropped
(the system message stays) and `dropped` says how many.
"""

from __future__ import annotations

from collections.abc import Iterator

from rlhf_engine.chat.errors import ContextLengthExceededError
from rlhf_engine.chat.generator import ChatGenerator, Delta
from rlhf_engine.config.chat import SamplingParams


class ChatSession:
    def __init__(self, engine: ChatGenerator, params: SamplingParams, *, system: str | None = None) -> None:
        self.engine = engine
        self.params = params
        self.system = system
        self.history: list[dict[str, str]] = []
        self.dropped = 0
        self.last: Delta | None = None

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def clear(self) -> None:
        self.history = []

    def send(self, user: str) -> Iterator[str]:
        """The reply's text as it is generated; the turn joins the history once the reply is complete."""
        while True:  # bounded: each retry drops a turn of the history
            try:
                handle = self.engine.submit(self.messages(user), self.params)
                break
            except ContextLengthExceededError:
                if not self.history:
                    raise
                self.history = self.history[2:]  # oldest user turn and its answer
                self.dropped += 1
        parts = []
        for delta in handle:
            parts.append(delta.text)
            self.last = delta
            yield delta.text
        self.history += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": "".join(parts).strip()},
        ]
