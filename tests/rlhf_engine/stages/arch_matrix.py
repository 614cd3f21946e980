"""Every architecture of the tiny kit through the three steps, in one process (imports paid once).

    python arch_matrix.py OUT [ARCH ...]

For each architecture: SFT with LoRA (ZeRO-0), the reward model (ZeRO-2), then PPO with a LoRA actor
at ZeRO-3 (every parameter partitioned), EMA and PPO-ptx; then, from the same SFT and reward models
into OUT/ARCH/methods/, DPO with LoRA and GRPO with a LoRA actor at ZeRO-3. Writes OUT/report.json:
per architecture and step, the summary or the error (one architecture's failure does not hide the
others').
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from rlhf_engine.config.data import DataConfig
from rlhf_engine.config.ppo import PPOConfig
from rlhf_engine.config.train import DPOConfig, ModelOptions, RewardConfig, SFTConfig
from rlhf_engine.models.tiny import ARCHS, build_tiny
from rlhf_engine.stages import dpo, ppo, reward, sft


def run_arch(arch: str, out: Path) -> dict[str, Any]:
    base = str(build_tiny(arch, "xs"))  # type: ignore[arg-type]
    data = DataConfig(max_seq_len=64, max_prompt_len=32)
    common: dict[str, Any] = {
        "output_dir": str(out),
        "data": data,
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "eval_max_rows": 8,
        "checkpoint_interval": 0,
    }
    result: dict[str, Any] = {}
    steps = [
        (
            "sft",
            lambda: sft.run(SFTConfig(model_name_or_path=base, model=ModelOptions(lora_dim=4), **common)),
        ),
        (
            "reward",
            lambda: reward.run(
                RewardConfig(model_name_or_path=base, model=ModelOptions(zero_stage=2), **common)
            ),
        ),
        (
            "ppo",
            lambda: ppo.run(
                PPOConfig(
                    actor_model_name_or_path=str(out / "step1_sft"),
                    critic_model_name_or_path=str(out / "step2_reward"),
                    output_dir=str(out),
                    data=DataConfig(max_seq_len=64, max_prompt_len=32, unsup_data=["bundled:corpus"]),
                    actor=ModelOptions(
                        zero_stage=3, lora_dim=4, zero_param_persistence_threshold=0, dropout=0.0
                    ),
                    critic=ModelOptions(dropout=0.0),
                    max_answer_len=8,
                    per_device_generation_batch_size=4,
                    per_device_training_batch_size=4,
                    max_steps=1,
                    num_warmup_steps=0,
                    enable_ema=True,
                    unsup_coef=1.0,
                    eval_max_rows=4,
                    checkpoint_interval=0,
                    rollouts_per_step=1,
                )
            ),
        ),
        (
            "dpo",
            lambda: dpo.run(
                DPOConfig(
                    model_name_or_path=str(out / "step1_sft"),
                    model=ModelOptions(lora_dim=4, dropout=0.0),
                    learning_rate=1e-4,
                    **common | {"output_dir": str(out / "methods")},
                )
            ),
        ),
        (
            "grpo",
            lambda: ppo.run(
                PPOConfig(
                    actor_model_name_or_path=str(out / "step1_sft"),
                    reward_model_name_or_path=str(out / "step2_reward"),
                    output_dir=str(out / "methods"),
                    data=data,
                    algorithm="grpo",
                    samples_per_prompt=2,
                    actor=ModelOptions(
                        zero_stage=3, lora_dim=4, zero_param_persistence_threshold=0, dropout=0.0
                    ),
                    max_answer_len=8,
                    per_device_generation_batch_size=2,
                    per_device_training_batch_size=4,
                    max_steps=1,
                    num_warmup_steps=0,
                    eval_max_rows=4,
                    checkpoint_interval=0,
                    rollouts_per_step=1,
                )
            ),
        ),
    ]
    for name, step in steps:
        try:
            summary = step()
            result[name] = {"ok": True, "summary": {k: v for k, v in summary.items() if k != "options"}}
        except Exception as e:  # recorded, and the later steps of this architecture skipped
            result[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc()[-3000:],
            }
            break
    return result


def main() -> None:
    out = Path(sys.argv[1])
    archs = sys.argv[2:] or list(ARCHS)
    report = {arch: run_arch(arch, out / arch) for arch in archs}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
