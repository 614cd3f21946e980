"""The RLHF engine: the four (or five) models of step 3, each its own DeepSpeed engine.

- actor: trainable, from step 1 (its own ZeRO stage / offload / LoRA);
- reference: frozen copy of step 1 (ZeRO-3 when the actor is, or when it is offloaded to CPU);
- critic: trainable, from the step-2 reward model;
- reward: frozen, from step 2;
- actor_ema (optional): exponential moving average of the actor.

Each engine is initialised exactly once; generation switches the actor's own engine between train and
eval mode (see `generation.py`), nothing is copied or reloaded.

    engine = RLHFEngine(actor_model_name_or_path=..., critic_model_name_or_path=..., tokenizer=tok,
                        num_total_iters=n, args=PPOConfig(...))
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from rlhf_engine.algorithms.ppo import ema_update
from rlhf_engine.config.ppo import PPOConfig
from rlhf_engine.config.train import ModelOptions
from rlhf_engine.models.loading import apply_lora, load_config, load_model, resolve_model, set_dropout
from rlhf_engine.models.value import ValueModel
from rlhf_engine.runtime.deepspeed_setup import (
    build_ds_config,
    initialize,
    make_optimizer,
    make_scheduler,
    resolve_dtype,
)
from rlhf_engine.runtime.distributed import Dist, init_distributed
from rlhf_engine.runtime.saving import check_saveable

logger = logging.getLogger(__name__)


def as_ppo_config(args: Any) -> PPOConfig:
    """`args` as a PPOConfig: one already, a mapping, or an argparse-style namespace of its fields."""
    if isinstance(args, PPOConfig):
        return args
    values = dict(args) if isinstance(args, dict) else vars(args)
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    return PPOConfig(**{k: v for k, v in values.items() if k in names})


def check_hybrid_engine(config: PPOConfig, model_config: Any) -> None:
    """DeepSpeed's HybridEngine only works on CUDA with kernel-injection policies (docs/cpu.md)."""
    if not config.enable_hybrid_engine:
        return
    if not torch.cuda.is_available():
        raise ValueError(
            "enable_hybrid_engine: DeepSpeed's HybridEngine needs CUDA (its kernels are not "
            "implemented on CPU); drop the flag — the default generation path runs everywhere"
        )
    if model_config.model_type not in ("opt", "gpt2", "llama", "bloom", "gptj", "gpt_neox"):
        raise ValueError(
            f"enable_hybrid_engine: DeepSpeed has no injection policy for {model_config.model_type}; "
            "drop the flag"
        )
    from rlhf_engine.runtime.injection import injection_unsupported

    why = injection_unsupported()
    if why:
        raise ValueError(
            f"enable_hybrid_engine: {why}; drop the flag — the default generation path gathers once "
            "per generation and runs everywhere"
        )
    if config.actor.lora_dim:
        raise ValueError(
            "enable_hybrid_engine with actor LoRA is not supported by our glue; drop one of them"
        )


def frozen_ds_config(
    *,
    zero_stage: int,
    offload: bool,
    dtype: str,
    micro_batch: int,
    world_size: int,
    persistence_threshold: int | None = None,
) -> dict[str, Any]:
    """DeepSpeed config of a model that only runs forward passes (reference, reward, EMA)."""
    stage = 3 if (zero_stage == 3 or offload) else 0
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3 and persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
    }


def frozen_engine(
    path: str,
    *,
    kind: str,
    dtype: str,
    zero_stage: int,
    offload: bool,
    micro_batch: int,
    world_size: int,
    persistence_threshold: int | None = None,
    lora: ModelOptions | None = None,
) -> Any:
    """A model that only runs forward passes (a reference, a reward model, an EMA) as a DeepSpeed
    engine in eval mode, with no gradients; partitioned like its trained partner at ZeRO-3, its
    weights in CPU memory with `offload`."""
    import deepspeed

    ds_config = frozen_ds_config(
        zero_stage=zero_stage,
        offload=offload,
        dtype=dtype,
        micro_batch=micro_batch,
        world_size=world_size,
        persistence_threshold=persistence_threshold,
    )
    model = load_model(path, kind=kind, opts=ModelOptions(dropout=0.0), ds_config=ds_config)  # type: ignore[arg-type]
    if lora is not None and lora.lora_dim:
        apply_lora(model, lora, kind=kind)  # type: ignore[arg-type]
    module = ValueModel(model) if kind == "value" else model
    for p in module.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=ds_config)
    engine.eval()
    return engine


class RLHFEngine:
    """Actor, reference, critic, reward model and optional EMA actor as DeepSpeed engines."""

    def __init__(
        self,
        actor_model_name_or_path: str,
        critic_model_name_or_path: str,
        tokenizer: Any,
        num_total_iters: int,
        args: Any,
        reward_model_name_or_path: str | None = None,
    ) -> None:
        self.args = as_ppo_config(args)
        cfg = self.args
        self.tokenizer = tokenizer
        self.num_total_iters = max(1, num_total_iters)
        self.dist: Dist = init_distributed()
        self.actor_path = resolve_model(actor_model_name_or_path, field="actor_model_name_or_path")
        self.has_critic = cfg.algorithm == "ppo"  # grpo and rloo take their baseline from the group instead
        self.critic_path = (
            resolve_model(critic_model_name_or_path, field="critic_model_name_or_path")
            if self.has_critic
            else ""
        )
        reward = reward_model_name_or_path or cfg.reward_path
        self.reward_path = resolve_model(reward, field="reward_model_name_or_path") if reward else ""
        self.actor_dtype = resolve_dtype(cfg.actor)
        self.critic_dtype = resolve_dtype(cfg.critic)
        self.actor_config = load_config(self.actor_path, kind="causal_lm", field="actor_model_name_or_path")
        self.critic_config = (
            load_config(self.critic_path, kind="value", field="critic_model_name_or_path")
            if self.has_critic
            else None
        )
        check_hybrid_engine(cfg, self.actor_config)
        self.init_counts: dict[str, int] = {}

        self.actor, self.actor_lora, self.actor_dropout_restore = self._trainable(
            "actor",
            self.actor_path,
            cfg.actor,
            self.actor_dtype,
            lr=cfg.actor_learning_rate,
            weight_decay=cfg.actor_weight_decay,
            kind="causal_lm",
        )
        self.ref = self._frozen(
            "ref",
            self.actor_path,
            kind="causal_lm",
            dtype=self.actor_dtype,
            zero_stage=cfg.actor.zero_stage,
            offload=cfg.offload_reference_model,
        )
        self.actor_ema = None
        if cfg.enable_ema:
            # same structure as the actor (LoRA included) so parameters pair up one to one
            self.actor_ema = self._frozen(
                "actor_ema",
                self.actor_path,
                kind="causal_lm",
                dtype=self.actor_dtype,
                zero_stage=cfg.actor.zero_stage,
                offload=False,
                lora=cfg.actor,
            )
        self.critic: Any = None
        self.critic_lora: Any = None
        self.critic_dropout_restore: dict[str, float] = {}
        if self.has_critic:
            self.critic, self.critic_lora, self.critic_dropout_restore = self._trainable(
                "critic",
                self.critic_path,
                cfg.critic,
                self.critic_dtype,
                lr=cfg.critic_learning_rate,
                weight_decay=cfg.critic_weight_decay,
                kind="value",
            )
        self.reward: Any = None  # with a grader, its score_model parts are the only reward models
        if self.reward_path:
            self.reward = self._frozen(
                "reward",
                self.reward_path,
                kind="value",
                dtype=self.critic_dtype,
                zero_stage=cfg.critic.zero_stage,
                offload=cfg.offload_reward_model,
            )
        self.score_models: dict[str, Any] = {}  # a grader's score_model parts, by the name the grader gives
        grader = cfg.parsed_grader()
        for name in sorted(grader.score_models() if grader is not None else ()):
            path = resolve_model(name, field="grader.model")
            self.score_models[name] = self._frozen(
                "score_model",
                path,
                kind="value",
                dtype=self.critic_dtype,
                zero_stage=cfg.critic.zero_stage,
                offload=cfg.offload_reward_model,
            )

    # ------------------------------------------------------------------ construction

    def _count(self, name: str) -> None:
        self.init_counts[name] = self.init_counts.get(name, 0) + 1

    def _trainable(
        self,
        name: str,
        path: str,
        opts: ModelOptions,
        dtype: str,
        *,
        lr: float,
        weight_decay: float,
        kind: str,
    ) -> tuple[Any, Any, dict[str, float]]:
        cfg = self.args
        ds_config = build_ds_config(
            opts,
            micro_batch=cfg.per_device_training_batch_size,
            grad_accum=cfg.gradient_accumulation_steps,
            world_size=self.dist.world_size,
            gradient_clipping=cfg.gradient_clipping,
            dtype=dtype,
        )
        if name == "actor" and cfg.enable_hybrid_engine:
            ds_config["hybrid_engine"] = {
                "enabled": True,
                "max_out_tokens": cfg.data.max_prompt_len + cfg.max_answer_len,
                "inference_tp_size": 1,
                "release_inference_cache": False,
                "pin_parameters": True,
                "tp_gather_partition_size": 8,
            }
        model_config = load_config(path, kind=kind)  # type: ignore[arg-type]
        restore = set_dropout(model_config, opts.dropout)
        model = load_model(path, kind=kind, opts=opts, ds_config=ds_config, config=model_config)  # type: ignore[arg-type]
        lora = apply_lora(model, opts, kind=kind) if opts.lora_dim else None  # type: ignore[arg-type]
        check_saveable(model, config=model_config, kind=kind, lora=lora)  # type: ignore[arg-type]
        module = ValueModel(model) if kind == "value" else model
        optimizer = make_optimizer(
            module, opts, lr=lr, weight_decay=weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2)
        )
        scheduler = make_scheduler(
            optimizer, cfg.lr_scheduler_type, warmup=cfg.num_warmup_steps, total=self.num_total_iters
        )
        self._count(name)
        return initialize(module, optimizer, scheduler, ds_config), lora, restore

    def _frozen(
        self,
        name: str,
        path: str,
        *,
        kind: str,
        dtype: str,
        zero_stage: int,
        offload: bool,
        lora: ModelOptions | None = None,
    ) -> Any:
        engine = frozen_engine(
            path,
            kind=kind,
            dtype=dtype,
            zero_stage=zero_stage,
            offload=offload,
            micro_batch=self.args.per_device_training_batch_size,
            world_size=self.dist.world_size,
            persistence_threshold=self.args.actor.zero_param_persistence_threshold,
            lora=lora,
        )
        self._count(name)
        return engine

    # ------------------------------------------------------------------ EMA

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema ← β·ema + (1−β)·actor, partition by partition at ZeRO-3 (both are partitioned alike)."""
        if self.actor_ema is None:
            return
        actor_params = dict(self.actor.module.named_parameters())
        pairs = [(e, actor_params[n]) for n, e in self.actor_ema.module.named_parameters()]
        local: list[tuple[Any, Any]] = [
            (getattr(e, "ds_tensor", e), getattr(a, "ds_tensor", a)) for e, a in pairs
        ]
        if any(e.shape != a.shape for e, a in local):
            raise RuntimeError("EMA and actor are partitioned differently; keep their ZeRO settings equal")
        ema_update([e for e, _ in local], [a for _, a in local], beta=self.args.ema_beta)
