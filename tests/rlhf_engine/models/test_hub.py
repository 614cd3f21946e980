"""Hub ids offline: `--model org/name[@revision]` resolved from a Hugging Face cache laid out as the hub
client lays it out (blobs, snapshots of links, refs), made from the SmolLM2 folder — the path a GPU
user takes, exercised here without a hub."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_engine.models.loading import load_config, load_tokenizer, resolve_model

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAIN, V2 = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub_cache(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("hf_hub")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    for commit in (MAIN, V2):
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in smollm2.iterdir():
            if f.name == "generation_config.json" and commit == V2:  # revision v2 differs in one file
                blob = repo / "blobs" / hashlib.sha256(b"v2" + f.read_bytes()).hexdigest()
                blob.parent.mkdir(exist_ok=True)
                blob.write_text(
                    f.read_text().replace('"use_cache": true', '"use_cache": true,\n  "max_length": 77')
                )
            else:
                blob = (
                    repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
                )  # (the hub names blobs by etag)
                blob.parent.mkdir(exist_ok=True)
                if not blob.exists():
                    blob.symlink_to(f)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v2").write_text(V2)
    return cache


def test_a_hub_id_resolves_to_its_cached_snapshot_with_tokenizer_and_template(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    folder = Path(resolve_model(REPO))
    assert folder.name == MAIN and (folder / "model.safetensors").is_file()
    assert load_config(REPO, kind="causal_lm").model_type == "llama"
    tok = load_tokenizer(REPO)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and len(tok) == 49152


def test_a_revision_picks_its_snapshot_and_a_missing_one_is_named(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    assert Path(resolve_model(f"{REPO}@v2")).name == V2
    assert Path(resolve_model(f"{REPO}@{V2}")).name == V2  # a commit hash works as well as a tag
    assert '"max_length": 77' in (Path(resolve_model(f"{REPO}@v2")) / "generation_config.json").read_text()
    for missing in (f"{REPO}@nope", "HuggingFaceTB/NoSuchModel"):
        with pytest.raises(ValueError, match=r"is not in .* and the hub is off \(HF_HUB_OFFLINE=1\)"):
            resolve_model(missing, field="actor_model_name_or_path")


def test_chat_and_the_cli_take_the_hub_id(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_engine.chat import ChatGenerator, SamplingParams

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    with ChatGenerator.load(REPO, backend="transformers") as engine:
        reply = engine.generate(
            [{"role": "user", "content": "What is the capital of France?"}],
            SamplingParams(temperature=0, max_new_tokens=16),
        )
    assert "Paris" in reply.choices[0].text
    done = subprocess.run(
        [sys.executable, "-m", "rlhf_engine.cli", "data", "preview", "--tokenizer", REPO, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bad = subprocess.run(
        [sys.executable, "-m", "rlhf_engine.cli", "chat", "--path", f"{REPO}@nope"],
        input="",
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert (
        bad.returncode == 2 and "model_path: HuggingFaceTB/SmolLM2-135M-Instruct@nope is not in" in bad.stderr
    )
