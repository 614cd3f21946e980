"""Every architecture of the tiny kit through SFT, the reward model and PPO, and out as models that load.

The matrix runs once (arch_matrix.py, one process: SFT with LoRA at ZeRO-0, reward model at ZeRO-2,
PPO with a LoRA actor at ZeRO-3, EMA and PPO-ptx, 1-2 steps each); the tests read what it left.
Regression for the save bug: rotary models carry non-persistent `inv_freq` buffers, which the save
used to write and then refuse ("state dict does not fit the model") after the whole run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load_file

from rlhf_engine.config.train import ModelOptions
from rlhf_engine.models.loading import apply_lora, load_config
from rlhf_engine.models.tiny import ARCHS, build_tiny
from rlhf_engine.runtime.launch import LAUNCH_VARS
from rlhf_engine.runtime.saving import check_saveable, saved_keys
from rlhf_engine.stages.records import read_jsonl

ATTENTION = ("q_proj", "qkv_proj", "c_attn", "query_key_value")
MLP = ("fc1", "c_fc", "up_proj", "gate_up_proj", "dense_h_to_4h")


@pytest.fixture(scope="session")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("arch_matrix")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("arch_matrix.py")), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"dir": out, "report": json.loads((out / "report.json").read_text())}


def _loads_exactly(path: Path, kind: str) -> Any:
    """The folder loads with the Auto class a user would use, every weight accounted for."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    # (model, loading info): transformers types from_pretrained as returning the model alone
    model, info = cast(
        tuple[Any, dict[str, list[Any]]], cls.from_pretrained(str(path), output_loading_info=True)
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    keys = set(load_file(str(path / "model.safetensors")))
    assert not any("inv_freq" in k or "lora_" in k or "base_layer" in k for k in keys)
    # one saved tensor per distinct tensor of the model's state_dict (tied ones once); names may differ
    # where transformers renames on load (GPT-NeoX's embed_out is lm_head in memory)
    assert len(keys) == len({t.data_ptr() for t in model.state_dict().values()})
    return model


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_three_steps_train_and_save_loadable_models(arch: str, matrix: dict[str, Any]) -> None:
    report, run = matrix["report"][arch], matrix["dir"] / arch
    for step in ("sft", "reward", "ppo"):
        assert step in report and report[step]["ok"], report.get(step, {}).get("trace", report)
    sft = _loads_exactly(run / "step1_sft", "causal_lm")
    assert sft.config.model_type == load_config(str(build_tiny(arch, "xs")), kind="causal_lm").model_type  # type: ignore[arg-type]
    _loads_exactly(run / "step2_reward", "value")
    for name in ("actor", "actor_ema"):
        _loads_exactly(run / "step3_rlhf" / name, "causal_lm")
    _loads_exactly(run / "step3_rlhf" / "critic", "value")
    [m] = read_jsonl(run / "step3_rlhf" / "metrics.jsonl")
    assert all(
        m[k] is not None for k in ("reward_mean", "kl_to_ref", "actor_loss", "critic_loss", "unsup_loss")
    )
    # LoRA's default (all-linear, resolved per architecture) adapted attention and MLP both
    base = load_file(str(build_tiny(arch, "xs") / "model.safetensors"))  # type: ignore[arg-type]
    tuned = load_file(str(run / "step1_sft" / "model.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert any(a in k for k in changed for a in ATTENTION), sorted(changed)
    assert any(a in k for k in changed for a in MLP), sorted(changed)
    # the other methods on the same models: DPO (LoRA) and GRPO (LoRA actor at ZeRO-3, no critic)
    for step in ("dpo", "grpo"):
        assert step in report and report[step]["ok"], report.get(step, {}).get("trace", report)
    methods = run / "methods"
    _loads_exactly(methods / "step2_dpo", "causal_lm")
    assert {"rewards_margin", "rewards_accuracy"} <= set(
        read_jsonl(methods / "step2_dpo" / "metrics.jsonl")[-1]
    )
    _loads_exactly(methods / "step3_rlhf" / "actor", "causal_lm")
    assert not (methods / "step3_rlhf" / "critic").exists()
    [g] = read_jsonl(methods / "step3_rlhf" / "metrics.jsonl")
    assert g["critic_loss"] is None and g["reward_mean"] is not None and g["kl_to_ref"] is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_a_model_that_could_not_be_saved_is_refused_before_training(arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = str(build_tiny(arch, "xs"))  # type: ignore[arg-type]
    for kind, cls in (("causal_lm", AutoModelForCausalLM), ("value", AutoModelForSequenceClassification)):
        config = load_config(path, kind=kind)  # type: ignore[arg-type]
        config.num_labels = 1
        model = cls.from_pretrained(path, config=config)
        assert not any("inv_freq" in k for k in saved_keys(model))  # non-persistent buffers are not saved
        check_saveable(model, config=config, kind=kind, lora=None)  # type: ignore[arg-type]
        lora = apply_lora(model, ModelOptions(lora_dim=4), kind=kind)  # type: ignore[arg-type]
        check_saveable(model, config=config, kind=kind, lora=lora)  # type: ignore[arg-type]
        model.register_buffer("stray", torch.zeros(1))  # what the output class would not take
        with pytest.raises(ValueError, match=r"could not be saved as .*unexpected \['stray'\]"):
            check_saveable(model, config=config, kind=kind, lora=lora)  # type: ignore[arg-type]


def test_a_head_of_another_shape_is_refused_before_training() -> None:
    """A reward model is saved with one score; a model whose head has two would only fail at the end."""
    from transformers import AutoModelForSequenceClassification

    path = str(build_tiny("llama", "xs"))
    config = load_config(path, kind="value")
    two = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with pytest.raises(ValueError, match=r"other shapes \['score.weight \[2, 128\] vs \[1, 128\]'\]"):
        check_saveable(two, config=config, kind="value", lora=None)
