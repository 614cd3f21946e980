"""From a step's config to a DeepSpeed engine: the DeepSpeed config, optimizer and LR schedule.

- ZeRO 0-3; optimizer offload to CPU (parameters too at ZeRO-3) with DeepSpeedCPUAdam;
- fp32 / bf16 / fp16 (fp16 on CPU is refused with a clear error before anything loads);
- weight decay on every weight except biases and normalisation layers (DeepSpeed-Chat's rule);
- transformers' cosine/linear/constant schedules with warm-up, stepped by the engine.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rlhf_engine.config.train import ModelOptions

logger = logging.getLogger(__name__)


def resolve_dtype(opts: ModelOptions, *, cuda: bool | None = None) -> str:
    """The concrete dtype for `opts.dtype` on this machine; fp16 on CPU is an error."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if opts.dtype == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if opts.dtype == "fp16" and not cuda:
        raise ValueError(
            "dtype fp16 is not supported on CPU (DeepSpeed refuses it); use --dtype bf16 or fp32"
        )
    return opts.dtype


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_ds_config(
    opts: ModelOptions,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    gradient_clipping: float,
    dtype: str,
) -> dict[str, Any]:
    """A DeepSpeed config dict for a training engine."""
    zero: dict[str, Any] = {"stage": opts.zero_stage}
    if opts.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if opts.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if opts.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather ourselves, layer by layer
        if opts.zero_param_persistence_threshold is not None:
            zero["stage3_param_persistence_threshold"] = opts.zero_param_persistence_threshold
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # our own metrics replace DeepSpeed's periodic prints
        "wall_clock_breakdown": False,
    }
    return config


def _no_decay(model: torch.nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name == "bias" or p_name.endswith(".bias"):
                names.add(full)
    return names


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: decayed weights, and biases/norms without decay."""
    skip = _no_decay(model)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: torch.nn.Module, opts: ModelOptions, *, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    """AdamW: DeepSpeedCPUAdam when the optimizer state is offloaded, else torch's AdamW."""
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters (check lora_dim / only_optimize_lora)")
    if opts.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from rlhf_engine.runtime.ops import load_ops

        load_ops(("CPUAdamBuilder",))  # under the build lock (loaded already when the step prepared its ops)
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available())


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, *, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=max(1, total))


REDUCE_BUCKET = int(5e8)  # DeepSpeed's default reduce/all-gather bucket, in elements
PREFETCH_BUCKET = int(5e7)  # … and its ZeRO-3 prefetch bucket


def size_buckets(ds_config: dict[str, Any], model: torch.nn.Module) -> None:
    """ZeRO's gradient buckets no larger than the model's trainable parameters. DeepSpeed allocates its
    reduce bucket at full size whatever the model (5e8 elements: 1.9 GiB in fp32, 0.9 GiB in bf16 per
    process) — measured here as 1.9 GiB of a 25M-parameter model's 2.4 GiB peak at ZeRO-2
    (bench/memory.py)."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 0:
        return
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    zero = ds_config["zero_optimization"]
    zero.setdefault("reduce_bucket_size", max(1, min(REDUCE_BUCKET, trainable)))
    zero.setdefault("allgather_bucket_size", max(1, min(REDUCE_BUCKET, trainable)))
    if stage == 3:
        zero.setdefault("stage3_prefetch_bucket_size", max(1, min(PREFETCH_BUCKET, total)))


def initialize(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]
) -> Any:
    """`deepspeed.initialize` → the engine (it owns optimizer and scheduler steps)."""
    import deepspeed

    size_buckets(ds_config, model)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # one data-parallel rank: DeepSpeed's all-reduce would flatten every gradient into one buffer,
        # reduce it with nobody and copy it back (~25 ms a backward for the bench's 26M actor on CPU)
        engine.enable_backward_allreduce = False
    return engine
