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
from pathlib import Path
from typing import Any

import torch

from rlhf_engine.engine import fencing
from rlhf_engine.models.loading import ModelKind

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json")  # fmt: skip


def gathered_state_dict(module: torch.nn.Module, *, zero_stage: int, is_main: bool) -> dict[str, torch.Tensor]:
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
        for name, b in module.named_buffers():
            state[name] = b.detach().to("cpu", copy=True)
    return state


def load_full_state(module: torch.nn.Module, state: dict[str, torch.Tensor], *, zero_stage: int,
                    is_main: bool) -> None:  # fmt: skip
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

    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    return cls.from_config(config)


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


def save_hf_model(state: dict[str, torch.Tensor], *, config: Any, kind: ModelKind, out: Path,
                  lora: Any | None, dropout_restore: dict[str, float], tokenizer: Any, tokenizer_src: str,
                  dtype: torch.dtype) -> None:  # fmt: skip
    """Rank 0: write `state` as a loadable model folder at `out` (atomically replaced)."""
    fencing.check()
    for key, value in dropout_restore.items():
        setattr(config, key, value)
    model = _fresh_model(config, kind)
    target = model
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)  # same parameter names as the trained model
    missing, unexpected = target.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith(("lm_head.weight", "embed_out.weight"))}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"saving: state dict does not fit the model (missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)})")  # fmt: skip
    if lora is not None:
        model = model.merge_and_unload()
    model.tie_weights()
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".model."))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        copy_tokenizer(tokenizer_src, tmp, tokenizer)
        # the step folder also holds metrics, events and checkpoints: replace only model files
        for stale in out.glob("model*.safetensors*"):
            stale.unlink()
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
