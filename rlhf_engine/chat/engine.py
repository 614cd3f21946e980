"""The chat engine: one scheduler thread decodes every running sequence together (continuous batching).

A request is tokenised through the shared prompt formatter, its prompt is run alone (prefill), and
its sequences then join the running batch at the next token: the batch's KV cache grows by the new
rows (left-padded to the longest), and each decode step feeds every running sequence its last token
at once. A sequence leaves the batch when it ends (EOS, stop string, max_new_tokens, cancel), at a
token boundary, so a long reply never holds a short one back and a new request waits at most one
decode step to start.

Each sequence samples from its own seeded `torch.Generator` on the CPU (choice i of a request with
seed s uses s + i), so a seed gives the same tokens whether the request runs alone or batched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from rlhf_engine.chat.errors import ChatError, EngineBusy, EngineStopped, GenerationFailed, InvalidRequest
from rlhf_engine.chat.loading import LoadedModel, ReplyScorer, load_chat_model
from rlhf_engine.chat.sampling import next_token
from rlhf_engine.chat.text import StreamText
from rlhf_engine.config.chat import ChatEngineConfig, ChatLimits, SamplingParams
from rlhf_engine.engine.generation import cache_kwarg, forward_params

logger = logging.getLogger(__name__)

FinishReason = str  # "stop" (EOS or a stop string) | "length" | "cancelled"
MAX_MESSAGES = 1024
ROLES = ("system", "user", "assistant")


@dataclass
class Delta:
    """A piece of one reply. The last piece of a reply has `finish_reason` (and its reward, if scored)."""

    index: int  # which reply of the request (0 … n-1)
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    reward: float | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Choice:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    reward: float | None = None


@dataclass
class ChatResult:
    choices: list[Choice]
    usage: Usage
    time_to_first_token: float  # seconds from submit to the first token


class _Done:
    """End of a request's event stream."""


class RequestHandle:
    """One submitted request: iterate it for `Delta`s (each reply's pieces in order), `cancel()` it."""

    def __init__(self, request_id: str, messages: list[dict[str, str]], prompt_ids: list[int],
                 params: SamplingParams, max_new_tokens: int) -> None:  # fmt: skip
        self.id = request_id
        self.messages = messages
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.completion_tokens = 0
        self._events: queue.Queue[Delta | _Done | ChatError] = queue.Queue()
        self._cancel = threading.Event()
        self._open = params.n  # replies still running
        self._consumed = False
        self._wake: Callable[[], None] | None = None  # set by an async reader: called after each event

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating; the replies still running end with finish_reason "cancelled"."""
        self._cancel.set()

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=len(self.prompt_ids), completion_tokens=self.completion_tokens)

    def __iter__(self) -> Iterator[Delta]:
        self._start_reading()
        try:
            while (delta := self._unwrap(self._events.get())) is not None:
                yield delta
        finally:  # the reader stopped early (client gone): stop generating for it
            if self._open:
                self.cancel()

    async def aiter(self) -> AsyncIterator[Delta]:
        """The same stream for an asyncio reader: the scheduler thread wakes the event loop per event
        (no thread blocked per request). Leaving early cancels the request, as with `iter`."""
        import asyncio

        self._start_reading()
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(ready.set)

        self._wake = wake
        try:
            while True:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._events.empty():  # an event put after this check sets `ready` again
                        await ready.wait()
                    continue
                if (delta := self._unwrap(event)) is None:
                    return
                yield delta
        finally:
            self._wake = None
            if self._open:
                self.cancel()

    def _start_reading(self) -> None:
        if self._consumed:
            raise RuntimeError("a request's stream can be read once")
        self._consumed = True

    @staticmethod
    def _unwrap(event: Delta | _Done | ChatError) -> Delta | None:
        """The delta of an event; None at the end of the stream; the error raised."""
        if isinstance(event, _Done):
            return None
        if isinstance(event, ChatError):
            raise event
        return event

    def result(self) -> ChatResult:
        """Wait for every reply and return them whole."""
        parts: dict[int, list[Delta]] = {i: [] for i in range(self.params.n)}
        for delta in self:
            parts[delta.index].append(delta)
        choices = [Choice(index=i, text="".join(d.text for d in ds), token_ids=[t for d in ds for t in d.token_ids],
                          finish_reason=ds[-1].finish_reason or "cancelled", reward=ds[-1].reward)
                   for i, ds in parts.items()]  # fmt: skip
        ttft = (self.first_token_at or time.monotonic()) - self.submitted
        return ChatResult(choices=choices, usage=self.usage, time_to_first_token=ttft)

    # --- called by the scheduler thread
    def _emit(self, delta: Delta) -> None:
        if self.first_token_at is None and delta.token_ids:
            self.first_token_at = time.monotonic()
        self.completion_tokens += len(delta.token_ids)
        self._events.put(delta)
        if delta.finish_reason is not None:
            self._open -= 1
            if self._open == 0:
                self.finished_at = time.monotonic()
                self._events.put(_Done())
        self._notify()

    def _fail(self, error: ChatError) -> None:
        if self._open:
            self._open = 0
            self.finished_at = time.monotonic()
            self._events.put(error)
            self._notify()

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None:
            with contextlib.suppress(RuntimeError):  # the reader's event loop is closed: nobody listens
                wake()


@dataclass
class _Seq:
    """One reply being generated: a row of the running batch."""

    handle: RequestHandle
    index: int
    generator: torch.Generator
    text: StreamText
    tokens: list[int] = field(default_factory=list)
    finish: FinishReason | None = None


class ChatEngine:
    """Loads a model once and serves many concurrent requests from one scheduler thread."""

    def __init__(self, config: ChatEngineConfig) -> None:
        self.config = config
        self.limits = config.limits
        self.loaded: LoadedModel = load_chat_model(config)
        self.tokenizer = self.loaded.tokenizer
        self.scorer = ReplyScorer(self.loaded.reward_dir, self.loaded.device) if self.loaded.reward_dir else None
        self._takes_positions = "position_ids" in forward_params(self.loaded.module)
        self._cache_arg = cache_kwarg(self.loaded.module)
        self._pending: queue.Queue[RequestHandle | None] = queue.Queue()
        self._ids = itertools.count()
        self._closed = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # running batch: rows, their KV cache, attention mask (B, T) and the token each is to be fed next
        self._rows: list[_Seq] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._next: list[int] = []
        self._thread = threading.Thread(target=self._run, name="chat-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, model_path: str, **options: Any) -> ChatEngine:
        """`ChatEngine.load(path, backend=…, max_n=…)`: ChatEngineConfig and ChatLimits fields by name."""
        limit_names = {f.name for f in dataclasses.fields(ChatLimits)}
        limits = ChatLimits(**{k: options.pop(k) for k in list(options) if k in limit_names})
        return cls(ChatEngineConfig(model_path=model_path, limits=limits, **options))

    def __enter__(self) -> ChatEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def context_len(self) -> int:
        return self.loaded.context_len

    @property
    def running(self) -> int:
        """Sequences being decoded now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests queued, not started yet."""
        return self._pending.qsize()

    # ------------------------------------------------------------------ public API

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt tokens of a conversation — the shared formatter, as training tokenises it."""
        from rlhf_engine.data.formatter import encode_prompt

        return encode_prompt(check_messages(messages), self.tokenizer)

    def submit(self, messages: Sequence[dict[str, str]], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; its handle streams the replies. Bad parameters raise `InvalidRequest` here."""
        params = params or SamplingParams()
        msgs = check_messages(messages)
        prompt = self.prompt_ids(msgs)
        max_new = self.limits.check(params, prompt_tokens=len(prompt), context_len=self.context_len)
        handle = RequestHandle(f"req-{next(self._ids)}", msgs, prompt, params, max_new)
        with self._lock:
            if self._closed:
                raise EngineStopped("the chat engine is closed")
            if self._pending.qsize() >= self.config.max_queue:
                raise EngineBusy(f"{self.config.max_queue} requests are already waiting; retry shortly")
            self._pending.put(handle)
        return handle

    def stream(self, messages: Sequence[dict[str, str]], params: SamplingParams | None = None) -> Iterator[Delta]:
        """The replies' text as it is generated (stopping the iteration cancels the request)."""
        return iter(self.submit(messages, params))

    def generate(self, messages: Sequence[dict[str, str]], params: SamplingParams | None = None) -> ChatResult:
        return self.submit(messages, params).result()

    def close(self, *, drain_s: float = 0.0) -> None:
        """Stop the scheduler. Requests still running after `drain_s` seconds (none by default) end with
        `EngineStopped`; new submissions are refused at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + drain_s
        while (self._rows or not self._pending.empty()) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._pending.put(None)  # wakes an idle scheduler
        self._thread.join(timeout=60)

    # ------------------------------------------------------------------ scheduler thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not self._admit():
                break
            if not self._rows:
                continue
            try:
                self._drop_cancelled()
                if self._rows:
                    self._decode()
            except Exception as e:  # a model error ends the running requests, not the engine
                logger.exception("generation failed")
                self._fail_all(GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
        self._fail_all(EngineStopped("the chat engine was closed before the request finished"))
        while not self._pending.empty():
            handle = self._pending.get_nowait()
            if handle is not None:
                handle._fail(EngineStopped("the chat engine was closed before the request started"))

    def _admit(self) -> bool:
        """Start waiting requests while the batch has room (block when idle). False once closing."""
        while True:
            room = self.config.max_batch_size - len(self._rows)
            try:
                if not self._rows:
                    handle = self._pending.get()
                elif room > 0:
                    handle = self._pending.get_nowait()
                else:
                    return True
            except queue.Empty:
                return True
            if handle is None:
                return False
            if handle.params.n > room:  # wait for room; keep it first in line
                self._pending.queue.appendleft(handle)
                return True
            if handle.cancelled:
                for i in range(handle.params.n):
                    handle._emit(Delta(index=i, text="", finish_reason="cancelled"))
                continue
            try:
                self._prefill(handle)
            except Exception as e:
                logger.exception("prefill failed")
                handle._fail(GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, self._cache_arg: cache,
                                  "use_cache": True}  # fmt: skip
        if self._takes_positions:  # left-padded rows count positions from their first real token
            positions = mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = positions[:, -input_ids.shape[1] :].clamp(min=0)
        out = self.loaded.model(**kwargs)
        return out.logits[:, -1].float().cpu()  # (B, V)

    def _prefill(self, handle: RequestHandle) -> None:
        device = self.loaded.device
        ids = torch.tensor([handle.prompt_ids], device=device)  # (1, P)
        mask = torch.ones_like(ids)
        cache = _batch_cache(self.loaded.module.config)
        logits = self._forward(ids, mask, cache)[0]  # (V,)
        n = handle.params.n
        seed = handle.params.seed if handle.params.seed is not None else int.from_bytes(os.urandom(7), "little")
        rows = [_Seq(handle=handle, index=i, generator=torch.Generator().manual_seed(seed + i),
                     text=StreamText(self.tokenizer, handle.prompt_ids, handle.params.stop)) for i in range(n)]  # fmt: skip
        if n > 1:
            cache.batch_repeat_interleave(n)
            mask = mask.repeat(n, 1)
        for row in rows:
            self._step(row, logits)
        self._join(rows, cache, mask)

    def _decode(self) -> None:
        assert self._mask is not None
        device = self.loaded.device
        ids = torch.tensor(self._next, device=device).unsqueeze(1)  # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)  # (B, T+1)
        logits = self._forward(ids, self._mask, self._cache)  # (B, V)
        for i, row in enumerate(self._rows):
            self._step(row, logits[i])
        self._leave()

    def _step(self, row: _Seq, logits: torch.Tensor) -> None:
        """Sample one token for `row`, hand out its text, and decide whether the reply ended."""
        p = row.handle.params
        token = next_token(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, generator=row.generator)
        row.tokens.append(token)
        eos = token in self.loaded.eos_ids and not p.ignore_eos
        if not eos:
            row.text.push(token)
        if eos or row.text.stopped:
            row.finish = "stop"
        elif len(row.tokens) >= row.handle.max_new_tokens:
            row.finish = "length"
        self._hand_out(row, [token])

    def _hand_out(self, row: _Seq, tokens: list[int]) -> None:
        if row.finish is None:
            row.handle._emit(Delta(index=row.index, text=row.text.take(), token_ids=tokens))
            return
        row.text.flush()
        reward = None
        if self.scorer is not None and row.finish != "cancelled":
            try:
                reward = self.scorer.score(row.handle.messages, row.text.text)
            except Exception:  # a reward is extra: never lose the reply over it
                logger.exception("scoring the reply failed")
        row.handle._emit(Delta(index=row.index, text=row.text.take(final=True), token_ids=tokens,
                               finish_reason=row.finish, reward=reward))  # fmt: skip

    def _join(self, rows: list[_Seq], cache: Any, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows to the running batch (left-padding the shorter side)."""
        nxt = [r.tokens[-1] for r in rows]
        if not self._rows:
            self._rows, self._cache, self._mask, self._next = rows, cache, mask, nxt
        else:
            assert self._mask is not None
            width = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._cache.layers, cache.layers, strict=True):
                mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
                mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
            self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)])
            self._rows += rows
            self._next += nxt
        self._leave()

    def _leave(self) -> None:
        """Drop finished rows from the batch; trim padding columns no row needs any more."""
        keep = [i for i, r in enumerate(self._rows) if r.finish is None]
        if len(keep) == len(self._rows):
            self._next = [r.tokens[-1] for r in self._rows]
            return
        if not keep:
            self._rows, self._cache, self._mask, self._next = [], None, None, []
            return
        assert self._mask is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._rows = [self._rows[i] for i in keep]
        self._next = [r.tokens[-1] for r in self._rows]
        lead = int((self._mask.cumsum(1) == 0).sum(1).min())  # padding columns shared by every row
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, lead:]
                layer.values = layer.values[:, :, lead:]

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.finish is None and row.handle.cancelled:
                row.finish = "cancelled"
                self._hand_out(row, [])
        self._leave()

    def _fail_all(self, error: ChatError) -> None:
        for row in self._rows:
            row.handle._fail(error)
        self._rows, self._cache, self._mask, self._next = [], None, None, []


def _batch_cache(config: Any) -> Any:
    """A KV cache whose layers all hold every position, so batches can be joined and trimmed column
    by column. Sliding-window layers (Mistral, Gemma 2/3) keep only their window, a length of their
    own; for them a plain layer is used: the attention mask still limits each layer to its window
    (built from the config's layer types), so replies are the same, at the memory of a full cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        return cache
    return DynamicCache()


def _pad_left(x: torch.Tensor, width: int, *, dim: int = 2) -> torch.Tensor:
    """Zero-pad `x` on the left of `dim` to `width` (KV caches are (B, H, T, D), masks (B, T))."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [missing, 0]
    return F.pad(x, pad)


def check_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The conversation as plain dicts, checked: roles known, contents strings, ends with a user turn."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidRequest("messages: give a non-empty list of {role, content} messages", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages: {len(messages)} messages, at most {MAX_MESSAGES}", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}",
                                 param=f"messages[{i}].role")  # fmt: skip
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content: must be a string", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise InvalidRequest("messages: the last message must be the user's (the model answers it)", param="messages")
    return out
