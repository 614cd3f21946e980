"""The actor's switch between training and generation (our hybrid path), and forward-pass helpers.

Generation runs on the training engine's own module — no second copy of the weights, nothing
reloaded. Under ZeRO-3 every parameter is all-gathered once for the whole `generate` call and
DeepSpeed's per-module fetch/release hooks are lifted meanwhile, so a token costs no collective at
all (the plain path gathers each layer again for every token). Afterwards the parameters are
partitioned again and the hooks restored: the training engine is exactly as before.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)


def _zero3_offload(engine: Any) -> Any | None:
    """DeepSpeed's ZeRO-3 parameter coordinator object of an engine (None below ZeRO-3)."""
    if engine.zero_optimization_stage() != 3:
        return None
    opt = engine.optimizer
    return getattr(opt, "parameter_offload", opt)


def _remove_hooks(offload: Any) -> None:
    for p in offload.module.parameters():
        p.ds_active_sub_modules.clear()
    for hook in [*offload.forward_hooks, *offload.backward_hooks]:
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []


def _restore_hooks(offload: Any) -> None:
    offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def generation_mode(engine: Any, *, gather: bool = True) -> Iterator[Any]:
    """Yield the engine's module in eval mode, ready to `generate`; back to train mode after.

    At ZeRO-3 with `gather`, the parameters are gathered once for the whole block (see the module
    docstring); without it, ZeRO-3 keeps gathering layer by layer and the caller must pass
    `synced_gpus=True` to `generate` so ranks with shorter answers keep joining the collectives.
    """
    was_training = engine.module.training
    engine.eval()
    offload = _zero3_offload(engine) if gather else None
    try:
        if offload is None:
            yield engine.module
        else:
            import deepspeed

            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params):
                _remove_hooks(offload)
                try:
                    yield engine.module
                finally:
                    _restore_hooks(offload)
    finally:
        if was_training:
            engine.train()


def needs_synced_gpus(engine: Any, *, gather: bool, world_size: int) -> bool:
    """Whether `generate` must keep ranks in lock-step (ZeRO-3 without the gather-once path)."""
    return world_size > 1 and engine.zero_optimization_stage() == 3 and not gather


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (left padding): (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_params(module: Any) -> Any:
    """The parameters a model's (or a DeepSpeed engine's model's) `forward` takes, by name."""
    target = getattr(module, "module", module)  # a DeepSpeed engine wraps the model
    return inspect.signature(target.forward).parameters


def cache_kwarg(module: Any) -> str:
    """The name `generate` / `forward` take a KV cache by: `cache` (transformers 5.2x) or
    `past_key_values`."""
    return "cache" if "cache" in forward_params(module) else "past_key_values"


def lm_logits(
    engine: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    keep_last: int = 0,
    cache: Any = None,
    cached: int = 0,
) -> torch.Tensor:
    """Next-token logits of a causal LM (or DeepSpeed engine of one) for padded rows.

    (B, T, V); with `keep_last` = k only the last k positions' logits are computed, (B, k, V) — the
    LM head over a prompt's positions is wasted work when only the answer is scored. With `cache`
    holding the first `cached` columns (engine/prefix.py), only the rest run through the model.
    """
    params = forward_params(engine)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids(attention_mask)
    if cached:
        kwargs |= {"input_ids": input_ids[:, cached:], "use_cache": True, cache_kwarg(engine): cache}
        if "position_ids" in kwargs:
            kwargs["position_ids"] = kwargs["position_ids"][:, cached:]
    if keep_last and "logits_to_keep" in params:
        kwargs["logits_to_keep"] = keep_last
    logits = engine(**kwargs).logits
    return logits[:, -keep_last:] if keep_last else logits
