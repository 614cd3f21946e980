"""Chat generator config (per server) and sampling parameters (per request).

`SamplingParams` checks what a request can get wrong on its own (ranges, types); `ChatLimits.check`
adds what depends on the server (operator caps, the model's context length). Every error is a
`ChatRequestError` naming the field, so the CLI prints it and the API returns it as a 400.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rlhf_engine.chat.errors import ChatRequestError, ContextLengthExceededError

Backend = Literal["auto", "transformers", "deepspeed"]
DType = Literal["auto", "fp32", "bf16", "fp16", "int8"]
MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_LOGIT_BIAS = 1024  # entries of logit_bias


@dataclass
class SamplingParams:
    """How one request samples (OpenAI's chat-completion parameters, plus top_k and ignore_eos)."""

    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "tokens to generate at most (default: the server's default, within context)"},
    )
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy; higher = more random (0-2)"})
    top_p: float = field(
        default=1.0,
        metadata={
            "help": "nucleus sampling: keep the smallest set of tokens with this "
            "much probability (0 < top_p <= 1)"
        },
    )
    top_k: int = field(default=0, metadata={"help": "keep only the k most likely tokens (0 = all)"})
    stop: list[str] = field(
        default_factory=list, metadata={"help": "strings that end the reply (not included in it)"}
    )
    seed: int | None = field(
        default=None, metadata={"help": "sampling seed: the same seed gives the same tokens"}
    )
    n: int = field(default=1, metadata={"help": "replies to generate for the request"})
    ignore_eos: bool = field(
        default=False, metadata={"help": "keep generating past the end-of-sequence token"}
    )
    grammar: str | None = field(
        default=None,
        metadata={
            "help": "constrain each reply to this llguidance grammar (rlhf_engine.chat.structured.grammar_of "
            "makes one from OpenAI's response_format)"
        },
    )

    logprobs: bool = field(
        default=False, metadata={"help": "return each generated token's log-probability (the model's own)"}
    )
    top_logprobs: int = field(
        default=0,
        metadata={
            "help": f"also the most likely tokens at each position, 0-{MAX_TOP_LOGPROBS} (needs logprobs)"
        },
    )
    logit_bias: dict[int, float] = field(
        default_factory=dict,
        metadata={"help": "token id -> bias (-100 to 100) added to its logit before sampling"},
    )
    presence_penalty: float = field(
        default=0.0,
        metadata={"help": "subtracted from the logit of each token the reply already holds (-2 to 2)"},
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata={"help": "times a token's count in the reply, subtracted from its logit (-2 to 2)"},
    )

    def __post_init__(self) -> None:
        def bad(param: str, message: str) -> ChatRequestError:
            return ChatRequestError(f"{param}: {message}", param=param)

        if self.max_new_tokens is not None and (not _is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise bad("max_new_tokens", f"{self.max_new_tokens!r} must be a whole number of at least 1")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 2:
            raise bad("temperature", f"{self.temperature!r} must be between 0 and 2 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", f"{self.top_p!r} must be in (0, 1]; 1 keeps every token")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", f"{self.top_k!r} must be a whole number, 0 or more (0 keeps every token)")
        if not _is_int(self.n) or self.n < 1:
            raise bad("n", f"{self.n!r} must be a whole number of at least 1")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise bad("seed", f"{self.seed!r} must be a whole number in [0, 2^63 - 1]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", f"{self.logprobs!r} must be true or false")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad(
                "top_logprobs", f"{self.top_logprobs!r} must be a whole number from 0 to {MAX_TOP_LOGPROBS}"
            )
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "needs logprobs: true")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise bad(name, f"{value!r} must be between -2 and 2 (0 = off)")
        if not isinstance(self.logit_bias, dict):
            raise bad("logit_bias", "must be a map of token id to bias")
        if any(isinstance(k, str) for k in self.logit_bias):  # JSON's keys ("50256": -100), as OpenAI's
            self.logit_bias = {
                int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in self.logit_bias.items()
            }
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad("logit_bias", f"{len(self.logit_bias)} entries, at most {MAX_LOGIT_BIAS}")
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise bad("logit_bias", f"key {token!r} must be a token id (a whole number, 0 or more)")
            if not _is_number(bias) or not -100 <= bias <= 100:
                raise bad("logit_bias", f"the bias of token {token} ({bias!r}) must be between -100 and 100")

    @property
    def penalised(self) -> bool:
        """Whether the reply's own tokens change its next token's logits."""
        return bool(self.presence_penalty or self.frequency_penalty)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # NaN fails v == v


@dataclass
class ChatLimits:
    """Operator caps on what one request may ask for."""

    max_new_tokens_limit: int = field(
        default=2048, metadata={"help": "largest max_new_tokens a request may ask for"}
    )
    default_max_new_tokens: int = field(
        default=256, metadata={"help": "max_new_tokens when a request gives none"}
    )
    max_n: int = field(default=8, metadata={"help": "largest n (replies per request)"})
    max_stop: int = field(default=4, metadata={"help": "most stop strings per request"})
    max_stop_chars: int = field(default=64, metadata={"help": "longest stop string, in characters"})

    def __post_init__(self) -> None:
        for name in ("max_new_tokens_limit", "default_max_new_tokens", "max_n", "max_stop", "max_stop_chars"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r} must be at least 1")

    def check(self, params: SamplingParams, *, prompt_tokens: int, context_len: int) -> int:
        """The request's max_new_tokens once checked against the caps and the model's context."""
        if params.n > self.max_n:
            raise ChatRequestError(f"n: {params.n} is above this server's limit of {self.max_n}", param="n")
        if len(params.stop) > self.max_stop:
            raise ChatRequestError(
                f"stop: {len(params.stop)} strings given, at most {self.max_stop} allowed", param="stop"
            )
        if any(len(s) > self.max_stop_chars for s in params.stop):
            raise ChatRequestError(
                f"stop: each string must be at most {self.max_stop_chars} characters", param="stop"
            )
        if params.max_new_tokens is not None and params.max_new_tokens > self.max_new_tokens_limit:
            raise ChatRequestError(
                f"max_new_tokens: {params.max_new_tokens} is above this server's limit of "
                f"{self.max_new_tokens_limit}",
                param="max_new_tokens",
            )
        room = context_len - prompt_tokens
        if room < 1:
            raise ContextLengthExceededError(
                f"messages: the prompt has {prompt_tokens} tokens and the model's context is {context_len}; "
                "shorten the conversation",
                param="messages",
                prompt_tokens=prompt_tokens,
                context_len=context_len,
            )
        if params.max_new_tokens is None:
            return min(self.default_max_new_tokens, room)
        if params.max_new_tokens > room:
            raise ContextLengthExceededError(
                f"max_new_tokens: the prompt has {prompt_tokens} tokens and the model's context is "
                f"{context_len}, so at most {room} new tokens fit; lower max_new_tokens or shorten the "
                "conversation",
                param="max_new_tokens",
                prompt_tokens=prompt_tokens,
                context_len=context_len,
            )
        return params.max_new_tokens


@dataclass
class ChatGeneratorConfig:
    """How the chat generator loads a model and schedules requests."""

    model_path: str = field(
        default="",
        metadata={
            "help": "a causal LM directory, or a run directory (its step3_rlhf/actor, else step1_sft)",
            "aliases": ["--path"],
        },
    )
    backend: Backend = field(
        default="auto",
        metadata={
            "help": "transformers, or deepspeed (deepspeed.init_inference); auto picks the faster one "
            "measured (transformers on CPU, see docs/measurements/chat.md)"
        },
    )
    kernel_inject: bool = field(
        default=False,
        metadata={"help": "DeepSpeed-Inference kernel injection (CUDA and supported architectures only)"},
    )
    dtype: DType = field(
        default="auto",
        metadata={
            "help": "weights dtype for decoding (auto: fp32 on CPU, bf16 on CUDA; bf16 halves the bytes read "
            "per token where the CPU has AVX-512 BF16/AMX; int8: weight-only int8 linear layers (torchao), "
            "activations fp32 on CPU, bf16 on CUDA)"
        },
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N (auto: cuda when available)"})
    max_batch_size: int = field(default=32, metadata={"help": "sequences decoded together at most"})
    max_queue: int = field(default=256, metadata={"help": "requests waiting to start at most (then 'busy')"})
    max_prefill_tokens: int = field(
        default=4096,
        metadata={
            "help": "prompt tokens started together in one forward pass at most (a longer prompt runs alone)"
        },
    )
    prefix_cache_mb: float = field(
        default=256.0,
        metadata={
            "help": "memory for recent prompts' and replies' keys and values, reused by prompts that start "
            "alike (a shared system prompt, a conversation's earlier turns); 0: off"
        },
    )
    adapter_cache_mb: float = field(
        default=512.0,
        metadata={
            "help": "memory for LoRA adapters kept resident on this base model (least recently used evicted "
            "first, never one a request uses)"
        },
    )
    allow_pickle: bool = field(
        default=False,
        metadata={"help": "also load pickled weights (pytorch_model.bin); off: safetensors only"},
    )
    score_replies: bool = field(
        default=True,
        metadata={"help": "score each reply with the run's reward model when the model came from a run"},
    )
    limits: ChatLimits = field(default_factory=ChatLimits, metadata={"flatten": True})

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_prefill_tokens < 1:
            raise ValueError("max_batch_size, max_queue and max_prefill_tokens must be at least 1")
        if self.prefix_cache_mb < 0:
            raise ValueError("prefix_cache_mb must be 0 (off) or more")
        if self.limits.max_n > self.max_batch_size:
            raise ValueError(
                f"max_n {self.limits.max_n} must not exceed max_batch_size {self.max_batch_size}"
            )
        if self.kernel_inject and self.backend == "transformers":
            raise ValueError("kernel_inject needs backend deepspeed (or auto)")
