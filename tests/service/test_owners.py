"""One owner per concept: the CLI and the service read the same GPU catalogue, the same method → steps
table and plan a step's memory with the same function, so they cannot disagree."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from rlhf_engine import gpu_catalogue
from rlhf_engine import planner as pl
from rlhf_engine.config.args import dataclass_from_args
from rlhf_engine.config.ppo import PPOConfig
from rlhf_engine.config.train import SFTConfig
from service.jobs.memory import Shapes, plan_step_memory
from service.services import cost
from service.settings import Settings

ACTOR = pl.Shape(
    params=10**9, layers=10, hidden=1000, heads=10, kv_heads=10, vocab=1000, ffn=4000, gated=False
)
REWARD = pl.Shape(params=10**8, layers=4, hidden=500, heads=5, kv_heads=5, vocab=1000, ffn=2000, gated=False)


def _built(cls: type, **values: Any) -> Any:
    return dataclass_from_args(cls, argparse.Namespace(), file_values=values)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("command", ["sft", "ppo"])
def test_config_auto_and_the_service_plan_the_same_bytes_on_a_gpu(command: str, dtype: str) -> None:
    if command == "sft":
        built = _built(SFTConfig, model_name_or_path="a", dtype=dtype)
        config_class: type = SFTConfig
    else:
        built = _built(
            PPOConfig,
            actor_model_name_or_path="a",
            critic_model_name_or_path="c",
            actor_dtype=dtype,
            critic_dtype=dtype,
        )
        config_class = PPOConfig
    gib = gpu_catalogue.MEMORY_GIB["A100-80G"]
    # the CLI's --config auto on an 80 GiB GPU
    _, cli = pl.auto_options(
        built, command, gpus=1, device_bytes=gib * pl.GiB, cuda=True, fixed={}, shapes=(ACTOR, REWARD)
    )
    assert cli.workload.dtype_bytes == (4 if dtype == "fp32" else 2)
    actor, reward = pl.step_models(command, built, ACTOR, REWARD)
    as_configured = pl.plan_step(
        cli.workload,
        actor,
        reward,
        pl.choice_of(built, command),
        gpus=1,
        gpus_per_node=1,
        gpu_bytes=gib * pl.GiB,
    )
    # the service's estimate of the same step on the same GPU
    _, service = plan_step_memory(
        step=1 if command == "sft" else 3,
        command=command,
        built=built,
        values=None,
        explicit={},
        shapes=Shapes(actor=ACTOR, reward=REWARD),
        gpu_type="A100-80G",
        num_gpus=1,
        mode="auto",
        config_class=config_class,
    )
    assert service["per_gpu_bytes"] == round(as_configured.total_bytes)


def test_one_gpu_catalogue() -> None:
    settings = Settings(database_url="sqlite://")
    assert settings.gpu_types == list(gpu_catalogue.OFFERED)
    for name in settings.gpu_types:  # every offered type is priced (and planned, when it is a GPU)
        assert cost.price(name) == gpu_catalogue.CATALOGUE[name].usd_per_hour
        assert name == "cpu" or gpu_catalogue.MEMORY_GIB[name] == gpu_catalogue.CATALOGUE[name].memory_gib
    with pytest.raises(ValueError, match="gpu_types: H200-141G has no price in rlhf_engine/gpu_catalogue.py"):
        Settings(database_url="sqlite://", gpu_types=["cpu", "H200-141G"])
