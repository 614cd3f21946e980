"""LoRA adapters in PEFT's format, read and checked without torch (the API process checks uploads).

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors` whose keys are
`base_model.model.<module>.lora_A.weight` (rank × in) and `….lora_B.weight` (out × rank). It applies
to a base model when every adapted module is a linear layer of that base with the same in/out sizes,
each rank is the one the config names, and the tokenizer (when the folder carries one) is the base's.
Only what we apply exactly is accepted: plain LoRA (no DoRA, no LoRA biases, no fully trained
`modules_to_save`, no embedding or LM-head adapters) from safetensors (never a pickled file).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_DIR = "adapter"  # where a LoRA step writes its adapter, beside its merged model
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
MAX_HEADER = 100 * 2**20
DTYPES = ("F32", "F16", "BF16", "F64")


class AdapterError(ValueError):
    """An adapter that cannot be applied: the message names the file and the reason."""


@dataclass
class AdapterSpec:
    """What an adapter folder holds, checked: per module (rank, in, out) and its scaling."""

    modules: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # module → (rank, in, out)
    scaling: dict[str, float] = field(default_factory=dict)  # module → alpha / r (or / sqrt(r): rsLoRA)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (name → dtype, shape, offsets), read from its header."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise AdapterError(f"{path.name}: not a safetensors file (shorter than its header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER:
                raise AdapterError(f"{path.name}: not a safetensors file (a {n}-byte header)")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, AdapterError):
            raise
        raise AdapterError(f"{path.name}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path.name}: not a safetensors file (its header is not a table)")
    header.pop("__metadata__", None)
    size = path.stat().st_size - 8 - n
    ends = []
    for name, info in header.items():
        shape, offsets = info.get("shape") if isinstance(info, dict) else None, None
        if isinstance(info, dict):
            offsets = info.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise AdapterError(f"{path.name}: not a valid safetensors file (entry {name!r})")
        ends.append(offsets[1])
    if max(ends, default=0) != size:
        raise AdapterError(
            f"{path.name}: not a valid safetensors file (truncated, or bytes beyond its tensors)"
        )
    return header


def base_shapes(base_dir: Path) -> dict[str, list[int]]:
    """Every weight name of a base model folder and its shape (all shards)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        for name, info in safetensors_header(f).items():
            shapes[name] = list(info.get("shape", []))
    return shapes


def is_adapter(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def _pattern(patterns: dict[str, Any], module: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module whose name ends with it (as a
    plain suffix: a tenant's key is never run as a regular expression)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return None


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        raise AdapterError(f"{CONFIG}: missing or not valid JSON") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG}: not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{CONFIG}: peft_type {config.get('peft_type')!r}; only LoRA adapters are served")
    if config.get("use_dora"):
        raise AdapterError(
            f"{CONFIG}: use_dora is on; DoRA adapters are not served (merge it and upload a model)"
        )
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{CONFIG}: bias {config.get('bias')!r}; adapters with LoRA biases are not served")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{CONFIG}: modules_to_save {config['modules_to_save']} (whole trained modules); merge the "
            "adapter and upload the model instead"
        )
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise AdapterError(f"{CONFIG}: r must be a positive rank")
    alpha = config.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise AdapterError(f"{CONFIG}: lora_alpha must be a positive number")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
            for k, v in pattern.items()
        ):
            raise AdapterError(f"{CONFIG}: {name} must map module names to positive numbers")
    return config


def check_adapter(folder: Path, base_dir: Path) -> AdapterSpec:
    """The adapter in `folder` as it applies to the base model in `base_dir`, or `AdapterError` naming the
    file and the reason."""
    config = read_config(folder)
    pickled = sorted(p.name for p in folder.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth"))
    if not (folder / WEIGHTS).is_file():
        if pickled:
            raise AdapterError(
                f"{pickled[0]}: pickled weights, which can run code when loaded; save the adapter with "
                "safetensors (model.save_pretrained(dir, safe_serialization=True))"
            )
        raise AdapterError(f"{WEIGHTS}: missing (an adapter needs its weights in safetensors)")
    header = safetensors_header(folder / WEIGHTS)
    base = base_shapes(base_dir)
    r_default, alpha_default = int(config["r"]), float(config.get("lora_alpha") or config["r"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    parts: dict[str, dict[str, list[int]]] = {}
    for key, info in header.items():
        m = KEY_RE.fullmatch(key)
        if m is None:
            raise AdapterError(
                f"{WEIGHTS}: {key} is not a LoRA weight (base_model.model.<module>.lora_A/B.weight); only "
                "plain LoRA on linear layers is served"
            )
        if info.get("dtype") not in DTYPES:
            raise AdapterError(
                f"{WEIGHTS}: {key} has dtype {info.get('dtype')}; use float32, float16 or bfloat16"
            )
        shape = list(info.get("shape", []))
        parts.setdefault(m["module"], {})[m["part"]] = shape
    if not parts:
        raise AdapterError(f"{WEIGHTS}: holds no LoRA weights")
    spec = AdapterSpec()
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{WEIGHTS}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        a, b = ab["A"], ab["B"]
        weight = base.get(f"{module}.weight")
        if weight is None and "." in module:  # some checkpoints store the decoder without its prefix
            weight = base.get(f"{module.split('.', 1)[1]}.weight")
        if weight is None or len(weight) != 2:
            raise AdapterError(
                f"{WEIGHTS}: {module} is not a linear layer of the base model: this adapter was trained for "
                "another base model"
            )
        last = module.rsplit(".", 1)[-1]
        if "embed" in last or last in ("lm_head", "wte", "wpe", "embed_out", "word_embeddings"):
            raise AdapterError(f"{WEIGHTS}: {module}: adapters on embeddings or the LM head are not served")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterError(f"{WEIGHTS}: {module}: lora_A {a} and lora_B {b} are not a rank-r pair")
        rank = a[0]
        expected = _pattern(rank_pattern, module) or r_default
        if rank != expected:
            raise AdapterError(f"{WEIGHTS}: {module} has rank {rank}, but {CONFIG} says r={expected}")
        # a Linear stores (out, in); GPT-2's Conv1D stores (in, out) (fan_in_fan_out)
        out_in = (weight[1], weight[0]) if config.get("fan_in_fan_out") else (weight[0], weight[1])
        if (b[0], a[1]) != out_in:
            raise AdapterError(
                f"{WEIGHTS}: {module} maps {a[1]} → {b[0]} features, but the base's layer maps "
                f"{out_in[1]} → {out_in[0]}: this adapter was trained for another base model"
            )
        alpha = float(_pattern(alpha_pattern, module) or alpha_default)
        spec.modules[module] = (rank, a[1], b[0])
        spec.scaling[module] = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    check_tokenizer(folder, base_dir)
    return spec


def check_tokenizer(folder: Path, base_dir: Path) -> None:
    """A tokenizer shipped with the adapter must be the base's: same vocabulary and added tokens."""
    mine = folder / "tokenizer.json"
    if not mine.is_file():
        return
    theirs = base_dir / "tokenizer.json"

    def vocab(path: Path) -> Any:
        data = json.loads(path.read_text())
        return (data.get("model", {}).get("vocab"), [t.get("content") for t in data.get("added_tokens", [])])

    try:
        same = theirs.is_file() and vocab(mine) == vocab(theirs)
    except (OSError, ValueError, AttributeError):
        raise AdapterError("tokenizer.json: not a valid tokenizer file") from None
    if not same:
        raise AdapterError(
            "tokenizer.json: differs from the base model's (another vocabulary or added tokens); an adapter "
            "is served with its base's tokenizer, so it must have been trained with it"
        )
