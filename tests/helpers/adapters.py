"""LoRA adapters for tests: PEFT folders with random (non-zero) weights for a tiny base model, and the
merged model each equals (what serving an adapter must reproduce)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_adapter(
    base_dir: Path,
    out: Path,
    *,
    seed: int,
    rank: int = 4,
    targets: Any = "all-linear",
    scale: float = 1.0,
    **config: Any,
) -> Any:
    """Write a PEFT LoRA adapter for `base_dir` into `out` (safetensors) and return the merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        lora_dropout=0.0,
        init_lora_weights=False,
        **config,
    )
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft's random init: large enough to change the replies
                p.mul_(scale)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    cfg = out / "adapter_config.json"
    import json

    data = json.loads(cfg.read_text())
    data["base_model_name_or_path"] = base_dir.name
    cfg.write_text(json.dumps(data))
    return peft_model.merge_and_unload().eval()


def greedy(model: Any, prompt: list[int], new: int, eos: set[int] | None = None) -> list[int]:
    """The model's own greedy tokens, one full forward pass per token (no cache, no batch), ending at a
    token of `eos` (none by default: what the engine's `ignore_eos` greedy reply must equal)."""
    from tests.reference import decode

    return decode(model, prompt, new, eos=eos or set())[0]
