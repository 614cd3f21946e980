"""The chat generator: one scheduler thread decodes every running sequence together (continuous batching).

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
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from rlhf_engine.chat.adapters import AdapterBank
from rlhf_engine.chat.embed import Embeddings, EmbedJob, embed_ids, token_ids
from rlhf_engine.chat.errors import (
    ChatError,
    ChatRequestError,
    GenerationFailedError,
    GeneratorBusyError,
    GeneratorStoppedError,
    ModelLoadError,
)
from rlhf_engine.chat.kv import PrefixCache, batch_cache
from rlhf_engine.chat.loading import LoadedModel, ReplyScorer, load_chat_model
from rlhf_engine.chat.sampling import next_token
from rlhf_engine.chat.structured import Constraint, Vocabulary
from rlhf_engine.chat.text import StreamText
from rlhf_engine.config.chat import ChatGeneratorConfig, ChatLimits, SamplingParams
from rlhf_engine.data.tools import Reader as ToolReader
from rlhf_engine.data.tools import Style, ToolCall, calls_of, chosen, style_of
from rlhf_engine.data.tools import check as check_tools
from rlhf_engine.data.tools import grammar as tool_grammar
from rlhf_engine.runtime.generation import cache_kwarg, forward_params
from rlhf_engine.runtime.prefix import has_sliding_layers

logger = logging.getLogger(__name__)

FinishReason = str  # "stop" (EOS or a stop string) | "length" | "cancelled"
MAX_MESSAGES = 1024
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, penalties, bias and
    the grammar: what the model itself gave it), and the `top_logprobs` most likely tokens there."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """A piece of one reply. The last piece of a reply has `finish_reason` (and its reward, if scored)."""

    index: int  # which reply of the request (0 … n-1)
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    reward: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked for
    tool_calls: list[ToolCall] = field(default_factory=list)  # on the last piece (finish_reason tool_calls)


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
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass
class ChatResult:
    choices: list[Choice]
    usage: Usage
    time_to_first_token: float  # seconds from submit to the first token


class _Done:
    """End of a request's event stream."""


class RequestHandle:
    """One submitted request: iterate it for `Delta`s (each reply's pieces in order), `cancel()` it."""

    def __init__(
        self,
        request_id: str,
        messages: list[dict[str, Any]],
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        scope: str = "",
    ) -> None:
        self.id = request_id
        self.scope = scope
        self.messages = messages
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.constraints: list[Constraint] = []  # one per reply, with a grammar
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias as (ids, values)
        self.tool_names: set[str] | None = (
            None  # with tools the model may call: its replies are read for calls
        )
        self.adapter: str | None = None  # the LoRA adapter its rows decode with (None: the base)
        self.on_end: Callable[[], None] | None = None  # called once when the request ends
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
            while True:  # bounded: the engine ends every request (its tokens, a stop, an error, close)
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._events.empty():  # an event put after this check sets `ready` again
                        await ready.wait()  # bounded: woken by the engine's next event for this request
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
        choices = [
            Choice(
                index=i,
                text="".join(d.text for d in ds),
                token_ids=[t for d in ds for t in d.token_ids],
                finish_reason=ds[-1].finish_reason or "cancelled",
                reward=ds[-1].reward,
                logprobs=[lp for d in ds for lp in d.logprobs],
                tool_calls=ds[-1].tool_calls,
            )
            for i, ds in parts.items()
        ]
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
                self._ended()
                self._events.put(_Done())
        self._notify()

    def _fail(self, error: ChatError) -> None:
        if self._open:
            self._open = 0
            self.finished_at = time.monotonic()
            self._ended()
            self._events.put(error)
            self._notify()

    def _ended(self) -> None:
        end, self.on_end = self.on_end, None
        if end is not None:
            end()

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
    constraint: Constraint | None = None  # response_format's grammar
    counts: torch.Tensor | None = None  # (V,) how often each token is in the reply (with penalties)
    reader: ToolReader | None = None  # with tools: holds back text that may begin a call


class ChatGenerator:
    """Loads a model once and serves many concurrent requests from one scheduler thread."""

    def __init__(self, config: ChatGeneratorConfig) -> None:
        self.config = config
        self.limits = config.limits
        self.loaded: LoadedModel = load_chat_model(config)
        self.tokenizer = self.loaded.tokenizer
        self.scorer = (
            ReplyScorer(self.loaded.reward_dir, self.loaded.device) if self.loaded.reward_dir else None
        )
        self._takes_positions = "position_ids" in forward_params(self.loaded.module)
        self._cache_arg = cache_kwarg(self.loaded.module)
        self._keeps_logits = "logits_to_keep" in forward_params(self.loaded.module)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        model_config = self.loaded.module.config
        # prompts' keys/values kept for reuse (not for sliding-window models: a reused start leaves a gap
        # of padding columns inside a row, and their windows count columns)
        reuse = self.config.prefix_cache_mb > 0 and not has_sliding_layers(model_config)
        self._prefixes = PrefixCache(int(self.config.prefix_cache_mb * 2**20)) if reuse else None
        self._pending: queue.Queue[RequestHandle | EmbedJob | None] = queue.Queue()
        self._ids = itertools.count()
        self._closed = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # running batch: rows, their KV cache, attention mask (B, T) and the token each is to be fed next
        self._rows: list[_Seq] = []
        self._cache, self._layers = batch_cache(model_config)
        self._mask: torch.Tensor | None = None
        self._next: list[int] = []
        self._grammar_vocab: Vocabulary | None = None
        self.adapters = AdapterBank(
            self.loaded.module, self.loaded.model_dir, int(self.config.adapter_cache_mb * 2**20)
        )
        self._thread = threading.Thread(target=self._run, name="chat-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, model_path: str, **options: Any) -> ChatGenerator:
        """`ChatGenerator.load(path, backend=…, max_n=…)`: ChatGeneratorConfig and ChatLimits fields by
        name."""
        limit_names = {f.name for f in dataclasses.fields(ChatLimits)}
        limits = ChatLimits(**{k: options.pop(k) for k in list(options) if k in limit_names})
        return cls(ChatGeneratorConfig(model_path=model_path, limits=limits, **options))

    def __enter__(self) -> ChatGenerator:
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
    def prompt_cache(self) -> dict[str, int]:
        """Prompt tokens taken from the prompt cache and run through the model so far; its entries
        and bytes."""
        p = self._prefixes
        return {
            "reused_tokens": p.hits if p else 0,
            "prefilled_tokens": p.misses if p else 0,
            "entries": len(p) if p else 0,
            "bytes": p.bytes if p else 0,
        }

    @property
    def waiting(self) -> int:
        """Requests queued, not started yet."""
        return self._pending.qsize()

    # ------------------------------------------------------------------ public API

    def prompt_ids(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt tokens of a conversation (and the tools offered) — the shared formatter, as training
        tokenises it."""
        from rlhf_engine.data.formatter import encode_prompt

        return encode_prompt(check_messages(messages), self.tokenizer, tools)

    @property
    def tool_style(self) -> Style:
        """How this model's template writes tool calls (rlhf_engine/data/tools.py)."""
        return style_of(self.tokenizer)

    def submit(
        self,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        scope: str = "",
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: Any = "auto",
        parallel_tool_calls: bool = True,
        adapter: str | None = None,
    ) -> RequestHandle:
        """Queue a request; its handle streams the replies. Bad parameters raise `ChatRequestError` here.
        Cached prompt keys/values are reused only among requests of one `scope` (a server's tenant).
        `adapter` names a resident LoRA adapter (`load_adapter`) the replies decode with, batched with
        every other request whatever adapter it uses.

        With `tools` (OpenAI's function tools) the model is shown them and its replies are read for calls
        (`Delta.tool_calls`, finish_reason `tool_calls`); `tool_choice` required or a function's name makes
        it call one, with arguments that follow the schema (constrained decoding); none hides the tools."""
        params = params or SamplingParams()
        msgs = check_messages(messages)
        functions = check_tools(tools, tool_choice) if tools else []
        choice = chosen(tool_choice) or "auto"
        shown = functions if choice != "none" else None
        prompt = self.prompt_ids(msgs, shown)
        max_new = self.limits.check(params, prompt_tokens=len(prompt), context_len=self.context_len)
        handle = RequestHandle(f"req-{next(self._ids)}", msgs, prompt, params, max_new, scope)
        grammar = params.grammar
        if shown:
            handle.tool_names = {f["name"] for f in shown}
            calls = tool_grammar(shown, choice, parallel_tool_calls, self.tool_style)
            if calls is not None and grammar is not None:
                raise ChatRequestError(
                    "response_format: a reply cannot both call a tool and follow a schema; drop one of "
                    "response_format and tool_choice",
                    param="response_format",
                )
            grammar = calls or grammar
        if params.logit_bias:
            handle.bias = self._bias(params.logit_bias)
        if params.logprobs:  # tokens' bytes come from the grammar engine's view of the vocabulary
            self._vocabulary()
        if grammar is not None:  # one matcher per reply; a grammar it cannot use is refused here
            handle.constraints = [Constraint(self._vocabulary(), grammar) for _ in range(params.n)]
        if adapter is not None:
            self.adapters.pin(adapter)  # resident until the request ends
            handle.adapter, handle.scope = adapter, f"{scope}\x1f{adapter}"  # prompts cached per adapter
            handle.on_end = lambda: self.adapters.unpin(adapter)
        try:
            self._enqueue(handle)
        except ChatError:
            handle._ended()
            raise
        return handle

    def load_adapter(self, key: str, folder: str | Path) -> None:
        """Make the LoRA adapter in `folder` (PEFT format, for this base model) resident as `key`; requests
        then name it (`submit(adapter=key)`). Blocking (file reads): call it off the event loop."""
        if self.config.kernel_inject:
            raise ModelLoadError(
                "model: LoRA adapters need the base's own linear layers; DeepSpeed's kernel injection "
                "replaces them (serve this base without kernel_inject)",
                param="model",
            )
        self.adapters.load(key, Path(folder))

    def stream(
        self, messages: Sequence[dict[str, Any]], params: SamplingParams | None = None, **options: Any
    ) -> Iterator[Delta]:
        """The replies' text as it is generated (stopping the iteration cancels the request); `options`
        as `submit`'s."""
        return iter(self.submit(messages, params, **options))

    def generate(
        self, messages: Sequence[dict[str, Any]], params: SamplingParams | None = None, **options: Any
    ) -> ChatResult:
        """The whole replies; `options` as `submit`'s (tools, tool_choice, parallel_tool_calls, scope)."""
        return self.submit(messages, params, **options).result()

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits: token ids are below it."""
        head = self.loaded.module.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else len(self.tokenizer)

    def token_bytes(self, ids: Sequence[int]) -> list[bytes]:
        """Each token's own bytes (a token may hold part of a UTF-8 character: OpenAI's logprobs `bytes`)."""
        tokenizer = self._vocabulary().tokenizer
        return [tokenizer.decode_bytes([i]) for i in ids]

    def _bias(self, logit_bias: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """`logit_bias` as (ids, values) to add to a row's logits; an id outside the vocabulary is refused."""
        size = self.vocab_size
        outside = sorted(t for t in logit_bias if t >= size)
        if outside:
            raise ChatRequestError(
                f"logit_bias: token id {outside[0]} is outside this model's vocabulary (ids 0-{size - 1})",
                param="logit_bias",
            )
        ids = torch.tensor(list(logit_bias), dtype=torch.long)
        return ids, torch.tensor(list(logit_bias.values()), dtype=torch.float32)

    def _vocabulary(self) -> Vocabulary:
        """The tokenizer as the grammar engine sees it, made on first use (a structured reply)."""
        with self._lock:
            if self._grammar_vocab is None:
                self._grammar_vocab = Vocabulary(self.tokenizer, self.loaded.module, set(self.loaded.eos_ids))
            return self._grammar_vocab

    def embed(self, inputs: Sequence[str | Sequence[int]], adapter: str | None = None) -> Future[Embeddings]:
        """Queue texts (or token id lists) to embed (rlhf_engine.chat.embed), through a resident LoRA
        `adapter` when one is named; the future gets one unit vector per input, computed on the scheduler
        thread between decode steps. Bad inputs raise `ChatRequestError` here."""
        ids = token_ids(
            inputs,
            self.tokenizer,
            context_len=self.context_len,
            vocab_size=self.loaded.module.get_input_embeddings().num_embeddings,
        )
        job = EmbedJob(ids, adapter)
        if adapter is not None:
            self.adapters.pin(adapter)
            job.future.add_done_callback(lambda _: self.adapters.unpin(adapter))
        try:
            self._enqueue(job)
        except ChatError:
            job.future.cancel()
            raise
        return job.future

    def _enqueue(self, work: RequestHandle | EmbedJob) -> None:
        with self._lock:
            if self._closed:
                raise GeneratorStoppedError("the chat generator is closed")
            if self._pending.qsize() >= self.config.max_queue:
                raise GeneratorBusyError(
                    f"{self.config.max_queue} requests are already waiting; retry shortly"
                )
            self._pending.put(work)

    def close(self, *, drain_s: float = 0.0) -> None:
        """Stop the scheduler. Requests still running after `drain_s` seconds (none by default) end with
        `GeneratorStoppedError`; new submissions are refused at once."""
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
                self._fail_all(GenerationFailedError(f"generation failed: {type(e).__name__}: {e}"))
        self._fail_all(GeneratorStoppedError("the chat generator was closed before the request finished"))
        while not self._pending.empty():
            handle = self._pending.get_nowait()
            if isinstance(handle, EmbedJob):
                if handle.future.set_running_or_notify_cancel():
                    handle.future.set_exception(GeneratorStoppedError("the chat generator was closed"))
            elif handle is not None:
                handle._fail(
                    GeneratorStoppedError("the chat generator was closed before the request started")
                )

    def _admit(self) -> bool:
        """Start the waiting requests the batch has room for, prefilled together (block when idle).
        False once closing."""
        handles: list[RequestHandle] = []
        room, tokens = self.config.max_batch_size - len(self._rows), 0
        while True:  # bounded: the batch's room and the prefill budget; idle, the engine waits for work
            try:
                if not self._rows and not handles:
                    handle = self._pending.get()
                elif room > 0 and tokens < self.config.max_prefill_tokens:
                    handle = self._pending.get_nowait()
                else:
                    break
            except queue.Empty:
                break
            if handle is None:
                self._start(handles)
                return False
            if isinstance(handle, EmbedJob):  # one forward pass, no rows: done here and now
                self._embed(handle)
                continue
            if handle.params.n > room:  # wait for room; keep it first in line
                self._pending.queue.appendleft(handle)
                break
            if handle.cancelled:
                for i in range(handle.params.n):
                    handle._emit(Delta(index=i, text="", finish_reason="cancelled"))
                continue
            handles.append(handle)
            room -= handle.params.n
            tokens += len(handle.prompt_ids)
        self._start(handles)
        return True

    def _embed(self, job: EmbedJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            with self.adapters.lock:  # every row through the job's adapter (a one-row plan broadcasts)
                self.adapters.use([job.adapter])
                try:
                    got = embed_ids(self.loaded.module, self.loaded.device, job.token_ids, self._pad_id)
                finally:
                    self.adapters.plan = None
            job.future.set_result(got)
        except Exception as e:
            logger.exception("embedding failed")
            job.future.set_exception(GenerationFailedError(f"embedding failed: {type(e).__name__}: {e}"))

    def _start(self, handles: list[RequestHandle]) -> None:
        if not handles:
            return
        try:
            self._prefill(handles)
        except Exception as e:
            logger.exception("prefill failed")
            for handle in handles:
                handle._fail(GenerationFailedError(f"generation failed: {type(e).__name__}: {e}"))

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, cache: Any, adapters: list[str | None]
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            self._cache_arg: cache,
            "use_cache": True,
        }
        if self._takes_positions:  # padded rows count positions from their first real token
            positions = mask.long().cumsum(-1) - 1
            kwargs["position_ids"] = positions[:, -input_ids.shape[1] :].clamp(min=0)
        if (
            self._keeps_logits
        ):  # the LM head on the last position only (a 49k vocabulary: a fifth of a prefill)
            kwargs["logits_to_keep"] = 1
        with self.adapters.lock:  # each row's adapter, for this pass
            self.adapters.use(adapters)
            try:
                out = self.loaded.model(**kwargs)
            finally:
                self.adapters.plan = None
        return out.logits[:, -1].float().cpu()  # (B, V)

    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Run the new prompts through the model together: each row's cached prompt start (if any)
        left-padded to the longest, then the rest of its prompt left-padded likewise; sample each
        reply's first token and add the rows to the running batch."""
        device = self.loaded.device
        reuse = [
            self._prefixes.match(h.prompt_ids, h.scope) if self._prefixes else (0, None) for h in handles
        ]
        rests = [h.prompt_ids[n:] for h, (n, _) in zip(handles, reuse, strict=True)]
        width, rest_width = max(n for n, _ in reuse), max(len(r) for r in rests)
        mask = torch.zeros(len(handles), width + rest_width, dtype=torch.long, device=device)
        ids = torch.full((len(handles), rest_width), self._pad_id, dtype=torch.long, device=device)
        for i, ((n, _), rest) in enumerate(zip(reuse, rests, strict=True)):
            mask[i, width - n : width] = 1
            mask[i, mask.shape[1] - len(rest) :] = 1
            ids[i, rest_width - len(rest) :] = torch.tensor(rest, device=device)
        cache = DynamicCache()
        if width:
            for layer in range(len(self._layers)):
                kk = [_pad_left(e.kv[layer][0][:, :n], width) if e else None for n, e in reuse]
                vv = [_pad_left(e.kv[layer][1][:, :n], width) if e else None for n, e in reuse]
                like = next(k for k in kk if k is not None)
                keys = torch.stack([k if k is not None else like.new_zeros(like.shape) for k in kk])
                values = torch.stack([v if v is not None else like.new_zeros(like.shape) for v in vv])
                cache.update(keys, values, layer)
        logits = self._forward(ids, mask, cache, [h.adapter for h in handles])  # (R, V)
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = [(la.keys, la.values) for la in cache.layers]  # type: ignore[union-attr,misc]
        if self._prefixes is not None:
            for i, (h, (n, _)) in enumerate(zip(handles, reuse, strict=True)):
                self._prefixes.hits += n
                self._prefixes.misses += len(h.prompt_ids) - n
                columns = mask[i].nonzero().squeeze(1)
                kv = [(k[i][:, columns].clone(), v[i][:, columns].clone()) for k, v in new_kv]
                self._prefixes.add(h.prompt_ids, kv, h.scope)
        rows, index = [], []
        for i, handle in enumerate(handles):
            n = handle.params.n
            seed = (
                handle.params.seed
                if handle.params.seed is not None
                else int.from_bytes(os.urandom(7), "little")
            )
            for j in range(n):
                row = _Seq(
                    handle=handle,
                    index=j,
                    generator=torch.Generator().manual_seed(seed + j),
                    text=StreamText(self.tokenizer, handle.prompt_ids, handle.params.stop),
                    constraint=handle.constraints[j] if handle.constraints else None,
                    reader=ToolReader(self.tool_style, handle.tool_names) if handle.tool_names else None,
                )
                self._step(row, logits[i])
                rows.append(row)
                index.append(i)
        select = torch.tensor(index, device=device)
        expand = len(index) != len(handles)
        for mine, (keys, values) in zip(self._layers, new_kv, strict=True):
            mine.add_rows(keys[select], values[select]) if expand else mine.add_rows(keys, values)
        self._join(rows, mask[select] if expand else mask)

    def _decode(self) -> None:
        assert self._mask is not None
        device = self.loaded.device
        ids = torch.tensor(self._next, device=device).unsqueeze(1)  # (B, 1)
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)  # (B, T+1)
        logits = self._forward(ids, self._mask, self._cache, [r.handle.adapter for r in self._rows])  # (B, V)
        for i, row in enumerate(self._rows):
            self._step(row, logits[i])
        self._leave()

    def _step(self, row: _Seq, logits: torch.Tensor) -> None:
        """Sample one token for `row`, hand out its text, and decide whether the reply ended.

        The model's logits are shifted by `logit_bias` and OpenAI's penalties (presence: once per token
        the reply holds; frequency: per occurrence), then masked by the grammar, then sampled; the
        log-probabilities handed out are the model's own (before any of that), as vLLM's default."""
        p = row.handle.params
        raw = logits
        if row.handle.bias is not None:
            ids, values = row.handle.bias
            logits = logits.index_add(0, ids, values)
        if p.penalised and row.counts is not None:
            logits = logits - row.counts * p.frequency_penalty - (row.counts > 0).float() * p.presence_penalty
        if row.constraint is not None:  # only what the schema allows next
            logits = row.constraint.mask(logits)
        token = next_token(
            logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, generator=row.generator
        )
        row.tokens.append(token)
        if p.penalised:
            if row.counts is None:
                row.counts = torch.zeros_like(raw)
            row.counts[token] += 1
        logprobs = [_logprob(raw, token, p.top_logprobs)] if p.logprobs else []
        if row.constraint is not None:
            row.constraint.follow(token)
        eos = token in self.loaded.eos_ids and not p.ignore_eos
        if not eos:
            row.text.push(token)
        if eos or row.text.stopped or (row.constraint is not None and row.constraint.done):
            row.finish = "stop"
        elif len(row.tokens) >= row.handle.max_new_tokens:
            row.finish = "length"
        self._hand_out(row, [token], logprobs)

    def _hand_out(self, row: _Seq, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        if row.finish is None:
            text = row.text.take()
            if row.reader is not None:
                text = row.reader.push(text)
            row.handle._emit(Delta(index=row.index, text=text, token_ids=tokens, logprobs=logprobs or []))
            return
        row.text.flush()
        text = row.text.take(final=True)
        calls: list[ToolCall] = []
        if row.reader is not None:
            text = row.reader.push(text)
            rest, calls = row.reader.finish()
            text += rest
            if calls and row.finish == "stop":
                row.finish = "tool_calls"
        reward = None
        if self.scorer is not None and row.finish not in ("cancelled", "tool_calls"):
            try:
                reward = self.scorer.score(row.handle.messages, row.text.text)
            except Exception:  # a reward is extra: never lose the reply over it
                logger.exception("scoring the reply failed")
        row.handle._emit(
            Delta(
                index=row.index,
                text=text,
                token_ids=tokens,
                finish_reason=row.finish,
                reward=reward,
                logprobs=logprobs or [],
                tool_calls=calls,
            )
        )

    def _join(self, rows: list[_Seq], mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their keys and values already in the batch's cache) to the batch."""
        if not self._rows:
            self._rows, self._mask = rows, mask
        else:
            assert self._mask is not None
            width = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_pad_left(self._mask, width, dim=1), _pad_left(mask, width, dim=1)])
            self._rows += rows
        self._leave()

    def _leave(self) -> None:
        """Drop finished rows from the batch (the last row takes a finished one's place); trim padding
        columns no row needs any more once they are a quarter of the batch's width."""
        rows = self._rows
        gone = [i for i, r in enumerate(rows) if r.finish is not None]
        if not gone:
            self._next = [r.tokens[-1] for r in rows]
            return
        self._keep_replies(gone)
        if len(gone) == len(rows):
            self._clear()
            return
        assert self._mask is not None
        for i in reversed(gone):  # rows after i are live: the last one fills the hole
            last = len(rows) - 1
            if i != last:
                rows[i] = rows[last]
                self._mask[i] = self._mask[last]
                for layer in self._layers:
                    layer.move_row(last, i)
            rows.pop()
        self._mask = self._mask[: len(rows)]
        lead = int((self._mask.cumsum(1) == 0).sum(1).min())  # padding columns shared by every row
        if lead < max(16, self._mask.shape[1] // 4):
            lead = 0
        self._mask = self._mask[:, lead:]
        for layer in self._layers:
            layer.truncate(len(rows), lead)
        self._next = [r.tokens[-1] for r in rows]

    def _keep_replies(self, gone: list[int]) -> None:
        """Put finished replies' keys and values (prompt and reply) in the prompt cache: a conversation's
        next turn starts with them. The last token sampled has none yet (the model never saw it). Only
        what the cache will keep is copied (it fits, nothing holds it yet), and a failure here (out of
        memory) costs the cache entry, never a reply."""
        if self._prefixes is None:
            return
        assert self._mask is not None
        per_token = sum(layer.column_bytes for layer in self._layers)
        for i in gone:
            row = self._rows[i]
            tokens = row.handle.prompt_ids + row.tokens[:-1]
            wanted = self._prefixes.wants(tokens, per_token * len(tokens), row.handle.scope)
            if row.finish == "cancelled" or not wanted:
                continue
            columns = self._mask[i].nonzero().squeeze(1)
            if len(columns) != len(tokens):  # never expected: keep nothing rather than a wrong entry
                logger.warning(
                    "prompt cache: row %d holds %d positions for %d tokens", i, len(columns), len(tokens)
                )
                continue
            try:
                kv = [layer.row(i, columns) for layer in self._layers]
            except Exception:  # a cache entry is extra
                logger.exception("prompt cache: keeping a finished reply failed")
                continue
            self._prefixes.add(tokens, kv, row.handle.scope)

    def _clear(self) -> None:
        self._rows, self._mask, self._next = [], None, []
        for layer in self._layers:
            layer.truncate(0)

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.finish is None and row.handle.cancelled:
                row.finish = "cancelled"
                self._hand_out(row, [])
        self._leave()

    def _fail_all(self, error: ChatError) -> None:
        for row in self._rows:
            row.handle._fail(error)
        self._clear()


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under `logits` (V,) and the `top` most likely tokens'."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logp, min(top, logp.numel()))
        best = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token=token, logprob=float(logp[token]), top=best)


def _pad_left(x: torch.Tensor, width: int, *, dim: int = -2) -> torch.Tensor:
    """Zero-pad `x` on the left of `dim` to `width` (keys/values (…, T, D), masks (B, T) with dim=1)."""
    dim = dim % x.dim()
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [missing, 0]
    return F.pad(x, pad)


def check_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as plain dicts, checked: roles known, contents strings (an assistant turn that
    calls tools may have none), ends with a user turn or tool results."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatRequestError(
            "messages: give a non-empty list of {role, content} messages", param="messages"
        )
    if len(messages) > MAX_MESSAGES:
        raise ChatRequestError(
            f"messages: {len(messages)} messages, at most {MAX_MESSAGES}", param="messages"
        )
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ChatRequestError(
                f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}", param=f"messages[{i}].role"
            )
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise ChatRequestError(f"messages[{i}].content: must be a string", param=f"messages[{i}].content")
        turn: dict[str, Any] = {"role": role, "content": content}
        if calls:
            turn["tool_calls"] = calls_of(calls, f"messages[{i}].tool_calls")
        if role == "tool":
            call = m.get("tool_call_id")
            if not isinstance(call, str) or not call:
                raise ChatRequestError(
                    f"messages[{i}].tool_call_id: a tool message names the call it answers",
                    param=f"messages[{i}].tool_call_id",
                )
            turn["tool_call_id"] = call
        out.append(turn)
    if out[-1]["role"] not in ("user", "tool"):
        raise ChatRequestError(
            "messages: the last message must be the user's, or tool results (the model answers it)",
            param="messages",
        )
    return out
