"""The offline model kit: every architecture loads by path, offline, and generates; pretraining helps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_engine.config.data import DataConfig
from rlhf_engine.data.prepare import prepare_corpus
from rlhf_engine.models.tiny import ARCHS, build_tiny, tiny_config


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_load_offline_and_generate(arch: str) -> None:
    path = build_tiny(arch, "xs")  # type: ignore[arg-type]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # safetensors only
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    assert model.config.model_type == {"gemma3": "gemma3_text"}.get(
        arch, arch
    ) and model.config.vocab_size == len(tok)
    ids = tok(" Human: What color is the dog? Assistant:", return_tensors="pt")
    out = model.generate(
        **ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert out.shape[1] == ids["input_ids"].shape[1] + 8


def test_sizes_span_tests_to_benchmarks(tokenizer) -> None:
    counts = {}
    for size in ("xs", "s", "m"):
        model = AutoModelForCausalLM.from_config(tiny_config("opt", size, tokenizer))
        counts[size] = sum(p.numel() for p in model.parameters())
    assert counts["xs"] < 1.5e6 < counts["s"] < 10e6 < counts["m"] < 100e6


def _corpus_loss(path: Path, blocks: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return float(model(input_ids=blocks, labels=blocks).loss)


@pytest.mark.slow
def test_pretraining_learns_the_bundled_language_and_is_cached(tokenizer) -> None:
    blocks = torch.as_tensor(prepare_corpus(DataConfig(), tokenizer, 64)[-16:])
    random_init = build_tiny("gpt2", "xs")
    trained = build_tiny("gpt2", "xs", pretrain_steps=60)
    info = json.loads((trained / "tiny_model.json").read_text())
    assert info["pretrain_loss_last"] < info["pretrain_loss_first"] - 1.0
    assert _corpus_loss(trained, blocks) < _corpus_loss(random_init, blocks) - 1.0
    mtime = (trained / "model.safetensors").stat().st_mtime_ns
    assert build_tiny("gpt2", "xs", pretrain_steps=60) == trained  # same key → reused, not rebuilt
    assert (trained / "model.safetensors").stat().st_mtime_ns == mtime


def test_cli_writes_a_model_directory_and_refuses_to_clobber(tmp_path: Path) -> None:
    out = tmp_path / "m"
    cmd = [
        sys.executable,
        "-m",
        "rlhf_engine.cli",
        "models",
        "tiny",
        "--arch",
        "llama",
        "--size",
        "xs",
        "--out",
        str(out),
        "--sample",
        "",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.model_type == "llama"
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr and "Traceback" not in again.stderr
