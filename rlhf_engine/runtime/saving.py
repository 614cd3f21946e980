"""Saving a trained engine's model as a plain Hugging Face directory, whatever the ZeRO stage.

At ZeRO-3 each parameter is gathered one at a time (never the whole model on every rank) into a CPU
state dict on rank 0. LoRA adapters are fused into the weights, the dropout rates the training
overrode are put back, and the input model's tokenizer files are copied unchanged (so a tokenizer
saved for transformers 4.x and 5.x stays that way).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlhf_engine.models.adapter import ADAPTER_DIR
from rlhf_engine.models.loading import ModelKind
from rlhf_engine.runtime import fencing

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


def gathered_state_dict(
    module: torch.nn.Module, *, zero_stage: int, is_main: bool
) -> dict[str, torch.Tensor]:
    """Full CPU copies of every parameter and buffer (on rank 0; {} elsewhere). Collective at ZeRO-3."""
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if is_main:
                    state[name] = p.detach().to("cpu", copy=True)
        elif is_main:
            state[name] = p.detach().to("cpu", copy=True)
    if is_main:
        for name, b in persistent_buffers(module):
            state[name] = b.detach().to("cpu", copy=True)
    return state


def persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The buffers `state_dict()` holds. Not `named_buffers()`: transformers 5 registers rotary
    embeddings' `inv_freq` / `original_inv_freq` as non-persistent, and a saved model with them does
    not load (every Llama, Qwen, Mistral, Gemma, Phi and GPT-NeoX model)."""
    for prefix, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def saved_keys(module: torch.nn.Module) -> set[str]:
    """The keys `gathered_state_dict` will write for `module` (names only: nothing is gathered)."""
    return set(_saved_shapes(module))


def _saved_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key → full shape of what `gathered_state_dict` will write (ZeRO-3 keeps it in `ds_shape`)."""
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    return shapes | {n: tuple(b.shape) for n, b in persistent_buffers(module)}


def _misfit(target: torch.nn.Module, keys: set[str]) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys of a state dict with `keys` for `target`; tied output layers may be
    missing (they are the input embedding)."""
    expected = set(target.state_dict(keep_vars=True))
    tied = {k for k in expected - keys if k.endswith(("lm_head.weight", "embed_out.weight"))}
    return sorted(expected - keys - tied), sorted(keys - expected)


def check_saveable(module: torch.nn.Module, *, config: Any, kind: ModelKind, lora: Any | None) -> None:
    """Before training: the model this step will save fits the class it is saved as and loaded with
    (on the meta device: no memory, no weights). A mismatch found here costs nothing; at the end it
    cost the whole run."""
    import copy

    with torch.device("meta"):
        fresh = _fresh_model(copy.deepcopy(config), kind)
        if lora is not None:
            from peft import get_peft_model

            get_peft_model(fresh, copy.deepcopy(lora))
    shapes = _saved_shapes(module)
    missing, unexpected = _misfit(fresh, set(shapes))
    expected = fresh.state_dict(keep_vars=True)
    wrong = [
        f"{k} {list(shapes[k])} vs {list(expected[k].shape)}"
        for k in sorted(set(shapes) & set(expected))
        if shapes[k] != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"this {config.model_type} model could not be saved as {type(fresh).__name__} after training "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {wrong[:5]}); this is "
            "a bug of ours for this architecture: please report it with the model's config.json"
        )


def load_full_state(
    module: torch.nn.Module, state: dict[str, torch.Tensor], *, zero_stage: int, is_main: bool
) -> None:
    """Copy full tensors into the module's parameters (collective at ZeRO-3: rank 0's copy is
    scattered to every rank's partition)."""
    for name, p in module.named_parameters():
        if name not in state:
            continue
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if is_main:
                    p.data.copy_(state[name])
        else:
            p.data.copy_(state[name])


def _fresh_model(config: Any, kind: ModelKind) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "value":
        config.num_labels = 1  # one score (a causal LM's config says 2, the default)
        return AutoModelForSequenceClassification.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def copy_tokenizer(src: str, dest: Path, tokenizer: Any) -> None:
    """The input model's tokenizer files as they were; `save_pretrained` only for hub ids."""
    src_path = Path(src)
    copied = False
    if src_path.is_dir():
        for name in TOKENIZER_FILES:
            if (src_path / name).is_file():
                shutil.copy2(src_path / name, dest / name)
                copied = True
    if not copied:
        tokenizer.save_pretrained(str(dest))


def save_hf_model(
    state: dict[str, torch.Tensor],
    *,
    config: Any,
    kind: ModelKind,
    out: Path,
    lora: Any | None,
    dropout_restore: dict[str, float],
    tokenizer: Any,
    tokenizer_src: str,
    dtype: torch.dtype,
    adapter_of: str | None = None,
) -> None:
    """Rank 0: write `state` as a loadable model folder at `out` (atomically replaced). With `adapter_of`
    (LoRA trained on a frozen base: only_optimize_lora) the LoRA weights are also written as a PEFT
    adapter in `out/adapter/` whose base_model_name_or_path is that base: served on a shared base, a
    few MB instead of a whole copy."""
    fencing.check()
    for key, value in dropout_restore.items():
        setattr(config, key, value)
    model = _fresh_model(config, kind)
    target = model
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)  # same parameter names as the trained model
    missing, unexpected = _misfit(target, set(state))
    if missing or unexpected:
        raise RuntimeError(
            f"saving: state dict does not fit the model (missing {missing}, unexpected {unexpected})"
        )
    target.load_state_dict(state, strict=False)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".model."))
    try:
        if lora is not None and adapter_of is not None:
            _save_adapter(model, tmp / ADAPTER_DIR, base=adapter_of)
        if lora is not None:
            model = model.merge_and_unload()
        model.tie_weights()
        model = model.to(dtype)
        model.save_pretrained(str(tmp), safe_serialization=True)
        copy_tokenizer(tokenizer_src, tmp, tokenizer)
        # the step folder also holds metrics, events and checkpoints: replace only model files
        for stale in out.glob("model*.safetensors*"):
            stale.unlink()
        shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_adapter(peft_model: Any, dest: Path, *, base: str) -> None:
    """The LoRA weights of a PEFT model as an adapter folder (PEFT's own `save_pretrained`: safetensors,
    adapter_config.json) naming `base` as its base model."""
    peft_model.peft_config["default"].base_model_name_or_path = base
    peft_model.save_pretrained(str(dest), safe_serialization=True)
