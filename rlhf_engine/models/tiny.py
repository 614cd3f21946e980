"""The offline model kit: tiny models of every popular architecture, built from a config, no download.

Architectures (`--arch`): opt, gpt2, gpt_neox (learned / partial-rotary positions) and the rotary
families people bring — llama, mistral (sliding window), qwen2 (qkv bias), qwen3 (qk-norm), gemma3
(text: soft-capping, tied embeddings, sliding and full layers mixed), phi3 (fused qkv and gate/up).

`rlhf models tiny --arch opt --size xs --out DIR` writes an ordinary Hugging Face model directory
(config.json, model.safetensors, generation_config.json, the bundled tokenizer with its chat
template), so every later step loads it exactly as it would load `facebook/opt-1.3b`.
`--pretrain-steps K` first trains it K steps on the bundled corpus so it speaks the bundled language;
the result is cached by a hash of everything that determines it and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rlhf_engine.paths import cache_dir

logger = logging.getLogger(__name__)

Arch = Literal["opt", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt_neox"]
Size = Literal["xs", "s", "m"]
ARCHS: tuple[Arch, ...] = ("opt", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "gpt_neox")
SIZES_ORDER: tuple[Size, ...] = ("xs", "s", "m")
KIT_VERSION = "v1"  # bump when configs or pretraining change (new architectures need no bump)


@dataclass(frozen=True)
class TinySize:
    hidden: int
    layers: int
    heads: int
    ffn: int
    lr: float  # pretraining learning rate


# Parameters with the bundled tokenizer (vocab 556): xs ≈ 0.53M, s ≈ 3.4M, m ≈ 25.7M (OPT).
SIZES: dict[Size, TinySize] = {
    "xs": TinySize(hidden=128, layers=2, heads=4, ffn=512, lr=2e-3),
    "s": TinySize(hidden=256, layers=4, heads=4, ffn=1024, lr=1e-3),
    "m": TinySize(hidden=512, layers=8, heads=8, ffn=2048, lr=6e-4),
}
MAX_POSITIONS = 512
PROGRESS_ENV = "RLHF_PROGRESS_FILE"  # pretraining writes "done total" there every 10 steps
SLIDING_WINDOW = 64
PRETRAIN_BLOCK = 128
PRETRAIN_BATCH = 16


def tiny_config(arch: Arch, size: Size, tokenizer: Any) -> Any:
    """A transformers config of the given architecture and size for `tokenizer`'s vocabulary."""
    from transformers import (
        Gemma3TextConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    sh = SIZES[size]
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vocab = len(tokenizer)
    if arch == "opt":
        return OPTConfig(
            vocab_size=vocab,
            hidden_size=sh.hidden,
            num_hidden_layers=sh.layers,
            num_attention_heads=sh.heads,
            ffn_dim=sh.ffn,
            word_embed_proj_dim=sh.hidden,
            max_position_embeddings=MAX_POSITIONS,
            do_layer_norm_before=True,
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_embd=sh.hidden,
            n_layer=sh.layers,
            n_head=sh.heads,
            n_inner=sh.ffn,
            n_positions=MAX_POSITIONS,
            **ids,
        )
    # rotary families: SwiGLU has three matrices, so 2/3 of the width keeps a plain MLP's parameter
    # count; grouped-query attention with half as many KV heads, as Llama 3 / Qwen / Mistral have
    rotary = {
        "vocab_size": vocab,
        "hidden_size": sh.hidden,
        "num_hidden_layers": sh.layers,
        "num_attention_heads": sh.heads,
        "num_key_value_heads": max(1, sh.heads // 2),
        "intermediate_size": (2 * sh.ffn) // 3,
        "max_position_embeddings": MAX_POSITIONS,
        **ids,
    }
    if arch == "llama":
        return LlamaConfig(**rotary, tie_word_embeddings=True)
    if arch == "mistral":  # a window shorter than the test sequences, so the sliding path runs
        return MistralConfig(**rotary, sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    if arch == "qwen2":  # q/k/v projections with bias
        return Qwen2Config(**rotary, tie_word_embeddings=True, use_sliding_window=False)
    if arch == "qwen3":  # RMS norm on queries and keys; explicit head_dim
        return Qwen3Config(**rotary, head_dim=sh.hidden // sh.heads, tie_word_embeddings=True)
    if (
        arch == "gemma3"
    ):  # sliding and full layers mixed (a hybrid cache), logit soft-capping, tied embeddings
        kinds = ["sliding_attention", "full_attention"] * (sh.layers // 2)
        return Gemma3TextConfig(
            **rotary,
            head_dim=sh.hidden // sh.heads,
            sliding_window=SLIDING_WINDOW,
            layer_types=kinds,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        )
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**rotary, original_max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False)
    if arch == "gpt_neox":  # Pythia's shape: partial rotary, parallel residual, fused query_key_value
        return GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=sh.hidden,
            num_hidden_layers=sh.layers,
            num_attention_heads=sh.heads,
            intermediate_size=sh.ffn,
            max_position_embeddings=MAX_POSITIONS,
            use_parallel_residual=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            tie_word_embeddings=False,
            **ids,
        )
    raise ValueError(f"arch {arch!r} is not one of {ARCHS}")


def _key(arch: str, size: str, pretrain_steps: int, seed: int, tokenizer_dir: Path, corpus_fp: str) -> str:
    import torch
    import transformers

    payload = [
        KIT_VERSION,
        arch,
        size,
        pretrain_steps,
        seed,
        corpus_fp,
        torch.__version__,
        transformers.__version__,
        (tokenizer_dir / "tokenizer.json").read_text(),
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def pretrain(
    model: Any, blocks: Any, *, steps: int, lr: float, seed: int, progress: bool = False
) -> list[float]:
    """Plain next-token training on corpus blocks (cosine schedule, AdamW); returns the losses."""
    import torch
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    data = torch.as_tensor(blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
    )
    model.train()
    losses = []
    report = os.environ.get(PROGRESS_ENV)  # a parent that shows progress elsewhere (the training worker)
    for i in tqdm(range(steps), desc="pretrain", disable=not progress, leave=False):
        if report and i % 10 == 0:
            Path(report).write_text(f"{i} {steps}")
        idx = torch.randint(len(data), (PRETRAIN_BATCH,), generator=g)
        batch = data[idx]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny(
    arch: Arch,
    size: Size,
    *,
    pretrain_steps: int = 0,
    seed: int = 0,
    progress: bool = False,
    tokenizer_from: str | None = None,
) -> Path:
    """The cached model directory for these settings, built on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils.logging import disable_progress_bar

    from rlhf_engine.config.data import DataConfig
    from rlhf_engine.data.bundled import bundled_path
    from rlhf_engine.data.io import fingerprint
    from rlhf_engine.data.prepare import prepare_corpus
    from rlhf_engine.models.tokenizer import bundled_tokenizer_dir
    from rlhf_engine.runtime.saving import TOKENIZER_FILES

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"size {size!r} is not one of {', '.join(SIZES)}")
    if pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be 0 or more, got {pretrain_steps}")
    if tokenizer_from == "smollm2":  # the real checkpoint the kit builds (rlhf_engine/models/gguf.py)
        from rlhf_engine.models.gguf import build_smollm2

        tokenizer_from = str(build_smollm2())
    tok_dir = Path(tokenizer_from) if tokenizer_from else bundled_tokenizer_dir()
    if not (tok_dir / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer: {tok_dir} has no tokenizer.json; point it at a model folder")
    key = _key(arch, size, pretrain_steps, seed, tok_dir, fingerprint(bundled_path("bundled:corpus")))
    dest = cache_dir("models") / f"tiny-{arch}-{size}-p{pretrain_steps}-{key[:12]}"
    if (dest / "config.json").is_file():
        return dest

    disable_progress_bar()  # transformers' per-shard bars would bury our own output
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, size, tokenizer))
    info: dict[str, Any] = {
        "arch": arch,
        "size": size,
        "pretrain_steps": pretrain_steps,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if pretrain_steps:
        blocks = prepare_corpus(DataConfig(), tokenizer, PRETRAIN_BLOCK)
        losses = pretrain(
            model, blocks, steps=pretrain_steps, lr=SIZES[size].lr, seed=seed, progress=progress
        )
        info["pretrain_loss_first"], info["pretrain_loss_last"] = (
            losses[0],
            sum(losses[-10:]) / len(losses[-10:]),
        )
    info["build_seconds"] = round(time.monotonic() - started, 2)

    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
    )
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in tok_dir.iterdir():
        if f.name in TOKENIZER_FILES:
            shutil.copy2(f, tmp / f.name)
    (tmp / "tiny_model.json").write_text(json.dumps(info, indent=2) + "\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # built concurrently: keep the other copy (same key, same content)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_tiny(
    out: Path,
    arch: Arch,
    size: Size,
    *,
    pretrain_steps: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    tokenizer_from: str | None = None,
) -> Path:
    """Build (or reuse) a tiny model and copy it to `out`."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out: {out} exists and is not empty; choose another folder or pass --overwrite")
    src = build_tiny(
        arch, size, pretrain_steps=pretrain_steps, seed=seed, progress=progress, tokenizer_from=tokenizer_from
    )
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    return out
