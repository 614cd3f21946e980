"""Loading models for training: by path exactly as by hub id, checked before anything heavy runs.

`trust_remote_code` is always off; weights load from safetensors (transformers' default, and the only
format the tiny kit writes). Under ZeRO-3 the model is created inside `zero.Init` (through
transformers' `HfDeepSpeedConfig`) so a large model is partitioned as it loads, not after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from rlhf_engine.config.train import ModelOptions
from rlhf_engine.models.gguf import is_gguf

logger = logging.getLogger(__name__)

DROPOUT_KEYS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "hidden_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
)
ModelKind = Literal["causal_lm", "value"]


HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@[\w./-]+)?")  # org/name, optionally @revision (branch, tag or commit)
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*"]  # never pickled weights


def hub_snapshot(name: str, *, field: str = "model_name_or_path") -> str:
    """The local folder of hub id `org/name[@revision]`: the Hugging Face cache's snapshot, fetched
    first when the hub is reachable (safetensors, configs and tokenizer files only; never pickles).
    With HF_HUB_OFFLINE=1 only what the cache holds."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = name.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    cache = os.environ.get("HF_HUB_CACHE") or None  # read now, not at import: tests and workers set it late
    try:
        folder = Path(
            snapshot_download(
                repo,
                revision=revision or None,
                cache_dir=cache,
                local_files_only=offline,
                allow_patterns=HUB_FILES,
            )
        )
    except LocalEntryNotFoundError:
        where = cache or "the Hugging Face cache"
        raise ValueError(
            f"{field}: {name} is not in {where} and the hub is off (HF_HUB_OFFLINE=1); download it "
            "where the hub is reachable (huggingface-cli download), or give a model folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ValueError(f"{field}: {name}: {type(e).__name__}: {e}") from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"{field}: {name}{'' if revision else ' (main)'} has no config.json")
    return str(folder)


def resolve_model(name: str, *, field: str = "model_name_or_path") -> str:
    """A local directory (checked), a `.gguf` file (converted once) or a hub id `org/name[@rev]` (its
    local snapshot folder: everything downstream reads a folder)."""
    path = Path(name).expanduser()
    if is_gguf(name) and path.is_file():  # a llama.cpp file: dequantised once into a cached folder
        from rlhf_engine.models.gguf import gguf_to_hf

        return str(gguf_to_hf(path, field=field))
    if path.exists():
        if not (path / "config.json").is_file() and field != "tokenizer":
            raise ValueError(
                f"{field}: {name} has no config.json; point it at a Hugging Face model directory"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or not HUB_ID.fullmatch(name):
        raise ValueError(
            f"{field}: {name} does not exist (a folder, a .gguf file, or a hub id org/name[@revision])"
        )
    return hub_snapshot(name, field=field)


def load_tokenizer(name: str, *, field: str = "model_name_or_path") -> Any:
    """The tokenizer of a model directory or hub id (trust_remote_code off); it must have EOS."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(name, field=field), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{field}: cannot load a tokenizer from {name}: {e}") from None
    if tok.eos_token_id is None:
        raise ValueError(f"{field}: the tokenizer of {name} has no EOS token, so answers could not end")
    return tok


def load_config(name: str, *, kind: ModelKind, field: str = "model_name_or_path") -> Any:
    """The model's config, checked to be a causal LM (or to have a sequence-classification head)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    folder = resolve_model(name, field=field)  # (its errors name the field already)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{field}: cannot load the config of {name}: {e}") from None
    if getattr(config, "auto_map", None):
        raise ValueError(f"{field}: {name} needs custom code (auto_map); trust_remote_code is off")
    mt = config.model_type
    is_value = config.architectures and any(
        a.endswith("ForSequenceClassification") for a in config.architectures
    )
    if kind == "causal_lm" and (mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or is_value):
        raise ValueError(f"{field}: {name} is a {config.architectures or mt} model, not a causal LM")
    if kind == "value" and mt not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ValueError(
            f"{field}: {name} ({mt}) has no sequence-classification head class in transformers, "
            "so it cannot be a reward model; use a GPT-2/OPT/Llama-family model"
        )
    return config


def set_dropout(config: Any, value: float | None) -> dict[str, float]:
    """Override every dropout rate the config has; returns the originals (to restore on save)."""
    originals: dict[str, float] = {}
    if value is None:
        return originals
    for key in DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            originals[key] = getattr(config, key)
            setattr(config, key, value)
    return originals


@contextlib.contextmanager
def zero3_init(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """While active, transformers creates models partitioned (ZeRO-3's zero.Init)."""
    if not ds_config or ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds it by weak reference only
    try:
        yield
    finally:
        del keep_alive


def load_model(
    name: str,
    *,
    kind: ModelKind,
    opts: ModelOptions,
    ds_config: dict[str, Any] | None,
    config: Any | None = None,
) -> Any:
    """A causal LM, or a sequence-classification model with one output (reward model / critic)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = config or load_config(name, kind=kind)
    set_dropout(config, opts.dropout)
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    if kind == "value":
        config.num_labels = 1
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if kind == "value":  # the report that the new head is "newly initialized" is expected, not news
        hf_logging.set_verbosity_error()
    try:
        with zero3_init(ds_config):
            model = cls.from_pretrained(name, config=config, trust_remote_code=False, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def value_head(model: Any) -> torch.nn.Module:
    """The output layer of a sequence-classification model (`score` in GPT-2/OPT/Llama)."""
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no 'score' or 'classifier' head")


def lora_config(opts: ModelOptions, *, kind: ModelKind) -> Any:
    from peft import LoraConfig

    targets: Any = opts.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=opts.lora_dim,
        lora_alpha=int(opts.lora_alpha or opts.lora_dim),
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        exclude_modules=["score", "classifier", "lm_head"] if kind == "value" else None,
    )


def apply_lora(model: Any, opts: ModelOptions, *, kind: ModelKind) -> Any:
    """Add LoRA adapters in place (the model object keeps its class and parameter names gain
    `base_layer` / `lora_A` / `lora_B`). Returns the LoRA config, needed to fuse on save."""
    from peft import get_peft_model

    cfg = lora_config(opts, kind=kind)
    get_peft_model(model, cfg)  # mutates `model`: its linear layers become LoRA layers
    for name, p in model.named_parameters():
        if opts.only_optimize_lora:
            p.requires_grad = "lora_" in name
        else:
            p.requires_grad = True
    if kind == "value":
        for p in value_head(model).parameters():
            p.requires_grad = True  # a new head must always learn
    return cfg
