"""Turning a growing list of token ids into text deltas, with stop strings.

Detokenising a whole reply at every token costs O(n²); decoding only a window of recent tokens
(as vLLM and TGI do) costs O(1) per token and gives the same text. A delta is held back while it
could still be the start of a stop string, or while it ends in an incomplete UTF-8 character, so
the client never receives text that is later taken back: the concatenation of the deltas is the
final text.
"""

from __future__ import annotations

from typing import Any

# Decoding starts a few prompt tokens back so tokenizers that drop a word's leading space at the
# start of a decode (SentencePiece) still produce it for the reply's first word.
_CONTEXT_TOKENS = 5


class StreamText:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens already turned into text
        self._stop = stop
        self.text = ""  # the reply so far (stop string cut off)
        self._sent = 0  # characters already handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token_id: int) -> None:
        """Add one generated token."""
        if self.stopped:
            return
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._append(after[len(before) :])
            self._prefix, self._read = self._read, len(self._ids)

    def flush(self) -> None:
        """The reply ended: whatever the last tokens decode to (an incomplete character too) joins
        the text."""
        if self.stopped or self._read == len(self._ids):
            return
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._append(after[len(before) :])
        self._prefix = self._read = len(self._ids)

    def _append(self, delta: str) -> None:
        start = self._sent
        self.text += delta
        if not self._stop:
            return
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _held(self) -> int:
        """How many trailing characters could still begin a stop string."""
        held = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text) - self._sent), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def take(self, *, final: bool = False) -> str:
        """The text not handed out yet that is safe to hand out (all of it when `final`)."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        delta = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta
