"""The chat generator: finished checkpoints served as streams of text, many requests batched together.

    from rlhf_engine.chat import ChatGenerator, SamplingParams
    with ChatGenerator.load("RUN") as engine:
        for delta in engine.stream([{"role": "user", "content": "Hi"}], SamplingParams(seed=1)):
            print(delta.text, end="", flush=True)

`rlhf chat --path RUN` is this engine in a terminal; the inference worker serves it over the network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_engine.chat.errors import (
    ChatError,
    ChatRequestError,
    ContextLengthExceededError,
    GenerationFailedError,
    GeneratorBusyError,
    GeneratorStoppedError,
    ModelLoadError,
)

if TYPE_CHECKING:
    from rlhf_engine.chat.generator import ChatGenerator, ChatResult, Delta, RequestHandle, Usage
    from rlhf_engine.config.chat import ChatGeneratorConfig, ChatLimits, SamplingParams

__all__ = [
    "ChatGenerator",
    "ChatGeneratorConfig",
    "ChatError",
    "ChatLimits",
    "ChatResult",
    "ContextLengthExceededError",
    "Delta",
    "GeneratorBusyError",
    "GeneratorStoppedError",
    "GenerationFailedError",
    "ChatRequestError",
    "ModelLoadError",
    "RequestHandle",
    "SamplingParams",
    "Usage",
]

_LAZY = {
    "ChatGenerator": "rlhf_engine.chat.generator",
    "ChatResult": "rlhf_engine.chat.generator",
    "Delta": "rlhf_engine.chat.generator",
    "RequestHandle": "rlhf_engine.chat.generator",
    "Usage": "rlhf_engine.chat.generator",
    "ChatGeneratorConfig": "rlhf_engine.config.chat",
    "ChatLimits": "rlhf_engine.config.chat",
    "SamplingParams": "rlhf_engine.config.chat",
}


def __getattr__(name: str) -> Any:  # torch is imported only when the engine is asked for
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
