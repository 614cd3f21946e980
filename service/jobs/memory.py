"""Will a job's steps fit on the GPUs it asks for? The memory planner (`rlhf_engine.planner`, torch-free) run
on each step's options at submit and estimate time.

`memory: "auto"` (the default): a step whose options do not fit on `num_gpus` × `gpu_type` takes the
planner's fastest configuration that does (ZeRO stage, offload, LoRA, gradient checkpointing, reference /
reward offload), keeping every option the request set itself; `"fixed"`: the options as given. A step that
cannot fit either way is refused with a 400 naming the smallest configuration that would (more GPUs of
the type, or a larger type). On `cpu` nothing is refused or changed: the plan is reported (fp32, no GPU).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_engine import gpu_catalogue
from rlhf_engine import planner as pl
from service.errors import InvalidRequestError

GPUS_PER_NODE = 8


@dataclass
class Shapes:
    actor: pl.Shape
    reward: pl.Shape | None


SMOLLM2 = {"layers": 30, "hidden": 576, "heads": 9, "kv_heads": 3, "ffn": 1536, "vocab": 49152}
GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")


def shape_of(path: Path, params_b: float, name: str) -> pl.Shape:
    """A model's shape from its folder on this server; a bundled model not built yet from its recipe; else
    an OPT-like shape of its estimated size."""
    from rlhf_engine.models import tiny
    from service.services import models as models_svc

    if (path / "config.json").is_file():
        try:
            return pl.load_shape(str(path), name=name)
        except (ValueError, OSError):
            pass
    params = round(params_b * 1e9)
    if m := models_svc.TINY_RE.fullmatch(path.name):
        t = tiny.SIZES[m.group(2)]  # type: ignore[index]
        return pl.Shape(
            params=params,
            layers=t.layers,
            hidden=t.hidden,
            heads=t.heads,
            kv_heads=t.heads,
            vocab=556,
            ffn=t.ffn,
            gated=m.group(1) in GATED,
            name=name,
        )
    if path.name == models_svc.SMOLLM2:
        return pl.Shape(params=params, gated=True, name=name, **SMOLLM2)
    if path.name == models_svc.SMOLLM2_RM:
        t = tiny.SIZES["xs"]
        return pl.Shape(
            params=params,
            layers=t.layers,
            hidden=t.hidden,
            heads=t.heads,
            kv_heads=t.heads,
            vocab=SMOLLM2["vocab"],
            ffn=t.ffn,
            gated=True,
            name=name,
        )
    return pl.Shape.from_params(params_b * 1e9, name=name)


def _gib(x: float) -> str:
    return f"{x / pl.GiB:.1f} GiB"


def plan_step_memory(
    *,
    step: int,
    command: str,
    built: Any,
    values: dict[str, Any] | None,
    explicit: dict[str, Any],
    shapes: Shapes,
    gpu_type: str,
    num_gpus: int,
    mode: str,
    config_class: type,
    gpu_memory: dict[str, float] | None = None,
    nodes: int = 1,
) -> tuple[Any, dict[str, Any]]:
    """(the step's config, possibly re-planned, and its memory plan as the estimate shows it). `values` (the
    step's flat options; None: plan only) is updated in place when the planner changes the configuration."""
    from rlhf_engine.config.args import dataclass_from_args

    method = built.algorithm if command == "ppo" else command
    actor, reward = pl.step_models(command, built, shapes.actor, shapes.reward)
    limit_gib = {**gpu_catalogue.MEMORY_GIB, **(gpu_memory or {})}.get(
        gpu_type
    )  # unknown: planned, not checked
    gpu = gpu_type != "cpu" and limit_gib is not None
    w = pl.step_workload(built, command, gpu=gpu_type != "cpu")
    limit = limit_gib * pl.GiB if gpu and limit_gib else None
    # GPUs of one node (ZeRO's host offload shares that node's memory): the job's even split over its
    # nodes, or up to GPUS_PER_NODE on one machine
    nodes_gpus = num_gpus // nodes if nodes > 1 else min(num_gpus, GPUS_PER_NODE)
    configured = pl.plan_step(
        w,
        actor,
        reward,
        pl.choice_of(built, method),
        gpus=num_gpus,
        gpus_per_node=nodes_gpus,
        gpu_bytes=limit,
        host_bytes=pl.HOST_GIB_PER_GPU * pl.GiB * nodes_gpus if gpu else None,
    )
    chosen, changed = configured, False
    if gpu and not configured.fits:
        search = pl.plan(
            w,
            actor,
            reward,
            gpus=num_gpus,
            gpus_per_node=nodes_gpus,
            gpu_bytes=limit,
            allowed=pl.allowed_by(explicit, method),
        )
        if mode == "auto" and search.best is not None:
            chosen, changed = search.best, True
            if values is not None:
                values.update(
                    {
                        k: v
                        for k, v in pl.step_options(search.best.choice, method, w).items()
                        if k not in explicit
                    }
                )
                built = dataclass_from_args(config_class, argparse.Namespace(), file_values=values)
        else:
            smallest = search.smallest
            if search.best is not None:
                options = json.dumps(pl.step_options(search.best.choice, method, w))
                here = (
                    f"on {num_gpus}× {gpu_type} it fits with {search.best.choice.describe()} "
                    f"(set memory: auto, or config.{command}: {options})"
                )
            else:
                memory = {**gpu_catalogue.MEMORY_GIB, **(gpu_memory or {})}
                fit = pl.smallest_fit(w, actor, reward, gpu_type=gpu_type, gpus=num_gpus, memory=memory)
                here = f"the smallest configuration that fits: {fit}"
            host = (
                f" and {_gib(smallest.host_bytes_per_node)} of host memory per node for what it offloads "
                f"(more than the {_gib(smallest.host_bytes or 0)} planned for)"
                if smallest.host_bytes is not None and smallest.host_bytes_per_node > smallest.host_bytes
                else ""
            )
            raise InvalidRequestError(
                f"gpu_type: step {step} ({method}) needs {_gib(configured.total_bytes)} per GPU "
                f"as configured ({configured.choice.describe()}) and {_gib(smallest.total_bytes)} "
                f"at its smallest ({smallest.choice.describe()}){host}; "
                f"{gpu_type} has {limit_gib:g} GiB; {here}",
                param="gpu_type",
            )
    return built, {
        "step": step,
        "method": method,
        "configuration": chosen.choice.describe(),
        "changed": changed,
        "step_options": pl.step_options(chosen.choice, method, w),
        "per_gpu_bytes": round(chosen.total_bytes),
        "gpu_bytes": round(limit) if limit else None,
        "headroom_bytes": round(chosen.headroom_bytes) if chosen.headroom_bytes is not None else None,
        "fits": chosen.fits if gpu else None,
        "host_bytes_per_node": round(chosen.host_bytes_per_node),
        "peak_phase": chosen.peak_phase,
    }
