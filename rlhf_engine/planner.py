"""The memory planner: per GPU, the bytes every model of a step holds — weights, gradients, optimizer
states, activations (with and without gradient checkpointing), the generation KV cache — for each choice
of ZeRO stage, offload, LoRA, checkpointing, reference/reward offload and micro-batch split; and the
fastest choice that fits.

Torch-free (the API server plans jobs and never imports torch). Sizes come from a model's config.json and
the tensor shapes in its safetensors headers (read as JSON, no weights loaded), or from a parameter count
alone (an OPT-like shape is assumed). The arithmetic, per data-parallel rank of N (b = 2 for bf16/fp16,
4 for fp32), calibrated against torch's allocator on this machine (bench/memory.py: 15 runs within 10%):

- weights: P × b; ÷ N at ZeRO-3; in host memory with parameter offload.
- optimizer: trainable × 12 (fp32 master, Adam's m and v; 8 when torch's AdamW steps fp32 weights in
  place at ZeRO-0); ÷ N from ZeRO-1; in host memory with optimizer offload.
- gradients: trainable × 4 (fp32 beside half weights; b at fp32 ZeRO-0); ÷ N from ZeRO-2, × 2 at ZeRO-3
  (a flat buffer and the partitions). Kept between steps from ZeRO-1 or with accumulation; else they exist
  only from backward to the optimizer step, which also makes AdamW's fp32 temporaries (trainable × 4 ÷ N).
- ZeRO buckets: 2 × min(5e8, trainable) × b (1 at ZeRO-3, plus min(5e7, P) prefetch and two gathered
  layers): our DeepSpeed configs cap them at the model's size; DeepSpeed's default is 5e8 whatever the model.
- LoRA (rank r, every linear layer, only the adapters train): trainable = r × (d_in + d_out) per linear.
- activations of B sequences of T tokens: per layer and token b × (6H + 2I), 4I with a gated MLP; logits of
  the scored positions × V × (b + 4, + 4 in half precision); backward starts with the logits' fp32
  gradient and the output embedding's gradient on top. With checkpointing: b × H per layer and token, plus
  one layer.
- KV cache of generation: 2 × L × B × (prompt + answer) × H_kv × b; step 3 scores the answer positions only.
- frozen models (reference, EMA, reward): weights only (÷ N at ZeRO-3; in host memory when offloaded).
- saving gathers CPU copies (P × b, twice with LoRA: merged into a copy): host memory, counted on a CPU.
- a step's peak = resident bytes + its largest phase (training, optimizer step, generation, experience,
  reference forward, save), × 1.10 for allocator fragmentation, + 1 GiB on a GPU (CUDA context, NCCL).

The cost model ranks the choices that fit by relative throughput (1.0 = plain data parallel): ZeRO-1
×0.98, ZeRO-2 ×0.95, ZeRO-3 ×0.75 (all-gathers in every forward and backward, and in generation);
optimizer offload ×0.55 (CPU Adam, PCIe), parameter offload ×0.5 more; gradient checkpointing ×0.77
(a second forward); LoRA ×0.9 (not slower, but it trains adapters only: full fine-tuning is preferred
when it fits); reference or reward model offload ×0.9 each; ×0.95 per halving of the micro-batch (with
twice the accumulation, the batch stays). Ties go to the smaller footprint.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rlhf_engine import gpu_catalogue

GiB = 2**30
ObjectiveName = Literal["sft", "reward", "dpo", "ppo", "grpo", "rloo"]
METHODS: tuple[str, ...] = ("sft", "reward", "dpo", "ppo", "grpo", "rloo")
HOST_GIB_PER_GPU = 128.0  # host memory for offload, per GPU of a node, unless told (cloud GPU nodes: 110-240)
FRAGMENTATION = 1.10
GPU_OVERHEAD = 1.0 * GiB
LORA_RANK = 16
ZERO_SPEED = {0: 1.0, 1: 0.98, 2: 0.95, 3: 0.75}
OPTION_SPEED = {
    "offload": 0.55,
    "param_offload": 0.5,
    "checkpointing": 0.77,
    "lora": 0.9,
    "frozen_offload": 0.9,
    "split": 0.95,
}
# OPT's shapes (layers, hidden) by size: a parameter count alone is planned with the nearest one's aspect
OPT_SHAPES = {
    0.125e9: (12, 768),
    0.35e9: (24, 1024),
    1.3e9: (24, 2048),
    2.7e9: (32, 2560),
    6.7e9: (32, 4096),
    13e9: (40, 5120),
    30e9: (48, 7168),
    66e9: (64, 9216),
    175e9: (96, 12288),
}


# Sizes of well-known hub models (billions of parameters): planned and priced without their files
KNOWN_PARAMS_B = {
    "facebook/opt-125m": 0.125,
    "facebook/opt-350m": 0.35,
    "facebook/opt-1.3b": 1.3,
    "facebook/opt-2.7b": 2.7,
    "facebook/opt-6.7b": 6.7,
    "facebook/opt-13b": 13.0,
    "facebook/opt-30b": 30.0,
    "facebook/opt-66b": 66.0,
    "facebook/opt-175b": 175.0,
    "meta-llama/Llama-2-7b-hf": 6.7,
    "meta-llama/Llama-2-13b-hf": 13.0,
    "meta-llama/Llama-2-70b-hf": 69.0,
    "bigscience/bloom-560m": 0.56,
    "EleutherAI/gpt-j-6b": 6.0,
    "gpt2": 0.124,
}


class PlanError(ValueError):
    """A plan request that cannot be answered as asked (the message says what to change)."""


# ---------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shape:
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    ffn: int
    gated: bool  # llama-family MLP: gate, up and down projections
    name: str = ""

    @property
    def kv_hidden(self) -> int:
        return self.hidden * self.kv_heads // max(self.heads, 1)

    def lora_params(self, rank: int) -> int:
        """Adapters on every linear layer of the blocks (q, k, v, o and the MLP's projections)."""
        h, kv, i = self.hidden, self.kv_hidden, self.ffn
        attn = rank * ((h + h) * 2 + (h + kv) * 2)
        mlp = rank * (h + i) * (3 if self.gated else 2)
        return self.layers * (attn + mlp)

    @classmethod
    def from_params(cls, params: float, name: str = "") -> Shape:
        """An OPT-like shape for a bare parameter count (vocabulary 50272, MLP 4H)."""
        if not params or params <= 0:
            raise PlanError(f"{name or 'model'}: a parameter count must be positive (e.g. 1.3e9)")
        near = min(OPT_SHAPES, key=lambda p: abs(math.log(p / params)))
        layers, hidden = OPT_SHAPES[near]
        scale = (params / near) ** (1 / 3)  # keep the aspect: L and H grow together
        layers, hidden = max(2, round(layers * scale)), max(64, round(hidden * scale / 64) * 64)
        return cls(
            params=int(params),
            layers=layers,
            hidden=hidden,
            heads=max(1, hidden // 64),
            kv_heads=max(1, hidden // 64),
            vocab=50272,
            ffn=4 * hidden,
            gated=False,
            name=name,
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], params: int | None = None, name: str = "") -> Shape:
        def get(*keys: str, default: int = 0) -> int:
            for k in keys:
                v = config.get(k)
                if isinstance(v, int) and v > 0:
                    return v
            return default

        hidden = get("hidden_size", "n_embd", "d_model")
        layers = get("num_hidden_layers", "n_layer", "num_layers")
        if not hidden or not layers:
            raise PlanError(
                f"{name or 'model'}: its config.json has no hidden size or layer count to plan from"
            )
        heads = get("num_attention_heads", "n_head", default=max(1, hidden // 64))
        kv = get("num_key_value_heads", default=heads)
        vocab = get("vocab_size", default=50272)
        ffn = get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
        gated = str(config.get("hidden_act", config.get("activation_function", ""))) in (
            "silu",
            "swiglu",
            "gelu_pytorch_tanh",
        ) and config.get("model_type") not in ("gpt2", "opt", "gpt_neox")
        if params is None:
            per_layer = (
                2 * hidden * hidden + 2 * hidden * (hidden * kv // heads) + (3 if gated else 2) * hidden * ffn
            )
            tied = config.get("tie_word_embeddings", True)
            params = (
                layers * per_layer + vocab * hidden * (1 if tied else 2) + (2 * layers + 1) * hidden
            )  # + norms
        return cls(
            params=int(params),
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv,
            vocab=vocab,
            ffn=ffn,
            gated=gated,
            name=name,
        )


def safetensors_params(directory: Path) -> int | None:
    """Parameters counted from the safetensors headers (8-byte length, then JSON of shapes): no
    weights read."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, meta in header.items():
            if key != "__metadata__":
                total += math.prod(meta["shape"])
    return total


def load_shape(model: str | float | int, *, name: str = "model") -> Shape:
    """A model as a directory (config.json, safetensors), a parameter count, or a known hub id."""
    if isinstance(model, int | float):
        return Shape.from_params(float(model), name=name)
    try:
        return Shape.from_params(float(model), name=name)
    except ValueError:
        pass
    path = Path(model)
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        return Shape.from_config(config, safetensors_params(path), name=name)
    if path.suffix == ".gguf":
        raise PlanError(
            f"{name}: plan a .gguf file by its parameter count (--{name.replace('_', '-')}-params)"
        )
    if model in KNOWN_PARAMS_B:
        return Shape.from_params(KNOWN_PARAMS_B[model] * 1e9, name=name)
    raise PlanError(
        f"{name}: {model!r} is not a model directory here, a known hub id or a parameter count; give "
        f"its size with --{name.replace('_', '-')}-params (e.g. 1.3e9)"
    )


# ---------------------------------------------------------------------------- a step's workload


@dataclass(frozen=True)
class Workload:
    """What one step runs per GPU: its method, sequence lengths and micro-batches."""

    method: ObjectiveName
    seq_len: int = 512  # prompt + answer (steps 1, 2 and DPO)
    prompt_len: int = 256  # step 3
    answer_len: int = 256  # step 3
    micro_batch: int = 4  # training sequences per GPU per micro-batch (DPO: pairs)
    generation_batch: int = 4  # prompts per GPU per generation call (step 3)
    accumulation: int = 1  # micro-batches per optimizer step
    generation_batches: int = 1  # generation calls per PPO step
    samples_per_prompt: int = 1  # grpo/rloo
    dtype_bytes: int = 2
    ema: bool = False
    reward_model: bool = True  # step 3 scores with a reward model (False: graders only)
    hybrid_engine: bool = False  # DeepSpeed's HybridEngine: generation gathers the whole actor on every GPU
    inference_tp_size: int = 1  # …split over this many GPUs (DeepSpeed-Chat's --inference_tp_size)


@dataclass(frozen=True)
class Setup:
    zero_stage: int = 0
    offload: bool = False  # optimizer state (and parameters at ZeRO-3) in host memory
    lora_dim: int = 0
    gradient_checkpointing: bool = False
    offload_frozen: bool = False  # reference and reward models in host memory (ZeRO-3 offload)
    split: int = 1  # micro-batches (and generation calls) this many times smaller, that many more of them

    def speed(self) -> float:
        s = ZERO_SPEED[self.zero_stage]
        if self.offload:
            s *= OPTION_SPEED["offload"] * (OPTION_SPEED["param_offload"] if self.zero_stage == 3 else 1.0)
        if self.gradient_checkpointing:
            s *= OPTION_SPEED["checkpointing"]
        if self.lora_dim:
            s *= OPTION_SPEED["lora"]
        if self.offload_frozen:
            s *= OPTION_SPEED["frozen_offload"]
        return s * OPTION_SPEED["split"] ** math.log2(self.split)

    def describe(self) -> str:
        parts = [f"ZeRO-{self.zero_stage}"]
        if self.offload:
            parts.append("optimizer+parameter offload" if self.zero_stage == 3 else "optimizer offload")
        if self.lora_dim:
            parts.append(f"LoRA r={self.lora_dim} (adapters only)")
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.offload_frozen:
            parts.append("reference/reward offload")
        if self.split > 1:
            parts.append(f"micro-batches ÷{self.split} (× {self.split} accumulation)")
        return ", ".join(parts)

    def model_options(self) -> dict[str, Any]:
        """The step options (ModelOptions fields) that apply this choice."""
        out: dict[str, Any] = {
            "zero_stage": self.zero_stage,
            "offload": self.offload,
            "gradient_checkpointing": self.gradient_checkpointing,
            "lora_dim": self.lora_dim,
        }
        if self.lora_dim:
            out["only_optimize_lora"] = True
        return out


@dataclass
class Part:
    """One line of the arithmetic: what, how many bytes per GPU, and how it was computed."""

    model: str
    what: str
    bytes: float
    formula: str


@dataclass
class StepPlan:
    method: str
    choice: Setup
    gpus: int
    gpu_bytes: float | None  # None: no limit (CPU)
    host_bytes: float | None = None  # host memory per node for offload (None: no limit)
    parts: list[Part] = field(default_factory=list)
    peak_phase: str = ""
    static_bytes: float = 0.0
    phase_bytes: dict[str, float] = field(default_factory=dict)
    host_bytes_per_node: float = 0.0
    total_bytes: float = 0.0
    activations_without_checkpointing: float = 0.0
    activations_with_checkpointing: float = 0.0

    @property
    def fits(self) -> bool:
        gpu = self.gpu_bytes is None or self.total_bytes <= self.gpu_bytes
        return gpu and (self.host_bytes is None or self.host_bytes_per_node <= self.host_bytes)

    @property
    def headroom_bytes(self) -> float | None:
        return None if self.gpu_bytes is None else self.gpu_bytes - self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "choice": asdict(self.choice),
            "configuration": self.choice.describe(),
            "step_options": self.choice.model_options(),
            "gpus": self.gpus,
            "gpu_bytes": self.gpu_bytes,
            "total_bytes": round(self.total_bytes),
            "headroom_bytes": None if self.headroom_bytes is None else round(self.headroom_bytes),
            "fits": self.fits,
            "speed": round(self.choice.speed(), 3),
            "peak_phase": self.peak_phase,
            "phases": {k: round(v) for k, v in self.phase_bytes.items()},
            "host_bytes_per_node": round(self.host_bytes_per_node),
            "host_bytes_limit": self.host_bytes,
            "activations_bytes": {
                "without_checkpointing": round(self.activations_without_checkpointing),
                "with_checkpointing": round(self.activations_with_checkpointing),
            },
            "parts": [asdict(p) | {"bytes": round(p.bytes)} for p in self.parts],
        }


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def logit_bytes(b: int) -> int:
    """Per position and vocabulary entry: the logits, their fp32 copy in half precision, the log-softmax."""
    return b + 4 + (4 if b < 4 else 0)


def activations(
    shape: Shape,
    *,
    batch: int,
    seq: int,
    b: int,
    checkpointing: bool,
    logits: bool = True,
    scored: int | None = None,
) -> tuple[float, str]:
    """What autograd keeps for backward: per layer and token b × (6H + 2I), 4I for a gated MLP (measured on
    OPT and SmolLM2 within 2%), plus the logits of the `scored` positions (default all); with
    checkpointing, each layer's input and one layer recomputed."""
    per_token_layer = b * (6 * shape.hidden + (4 if shape.gated else 2) * shape.ffn)
    scored = seq if scored is None else scored
    head = batch * scored * shape.vocab * logit_bytes(b) if logits else 0
    if checkpointing:
        body = batch * seq * (shape.layers * b * shape.hidden + per_token_layer)
        formula = f"{batch}×{seq} tok × ({shape.layers} layers × {b}·H + one layer of {per_token_layer} B)"
    else:
        body = batch * seq * shape.layers * per_token_layer
        formula = f"{batch}×{seq} tok × {shape.layers} layers × {per_token_layer} B"
    return body + head, formula + (
        f" + logits {batch}×{scored}×{shape.vocab}×{logit_bytes(b)}" if logits else ""
    )


def backward_tail(shape: Shape, *, batch: int, seq: int, b: int) -> float:
    """Backward starts at the head while every activation is alive: the logits' gradient (fp32) and the
    output embedding's gradient come on top of them."""
    return batch * seq * shape.vocab * 4 + shape.vocab * shape.hidden * b


def _trained(
    plan: StepPlan, name: str, shape: Shape, c: Setup, n: int, b: int, *, accumulation: int
) -> dict[str, float]:
    """Weights, gradients, optimizer state and ZeRO's buffers of a model that trains; returns the bytes of
    its phases beyond them ("optimizer step": gradients when they are not kept between steps, and the
    optimizer's temporaries; "save": the copy written out)."""
    p = shape.params
    trainable = shape.lora_params(c.lora_dim) if c.lora_dim else p
    z = c.zero_stage
    w_div = n if z == 3 else 1
    if c.offload and z == 3:
        plan.host_bytes_per_node += p * b / w_div
        plan.parts.append(Part(name, "weights", 0.0, f"offloaded: {p:.3g} × {b} B / {w_div} in host memory"))
    else:
        plan.parts.append(Part(name, "weights", p * b / w_div, f"{p:.3g} × {b} B / {w_div}"))
    # Adam's m and v in fp32, and an fp32 master copy unless torch's AdamW steps fp32 weights in place
    opt_bytes = 12 if (b < 4 or z >= 1) else 8
    o_div = n if z >= 1 else 1
    optim = trainable * opt_bytes / o_div
    grad_bytes = 4 if (b < 4 or z >= 1) else b  # DeepSpeed keeps gradients in fp32 beside half weights
    g_div = n if z >= 2 else 1
    grads = trainable * grad_bytes / g_div * (2 if z == 3 else 1)  # ZeRO-3: a flat buffer and the partitions
    if c.offload:
        plan.host_bytes_per_node += optim + grads
        plan.parts.append(
            Part(
                name, "optimizer", 0.0, f"offloaded: {trainable:.3g} × {opt_bytes} B / {o_div} in host memory"
            )
        )
        plan.parts.append(
            Part(
                name,
                "gradients",
                0.0,
                f"offloaded: {trainable:.3g} × {grad_bytes} B / {g_div} in host memory",
            )
        )
    else:
        plan.parts.append(Part(name, "optimizer", optim, f"{trainable:.3g} × {opt_bytes} B / {o_div}"))
    kept = z >= 1 or accumulation > 1  # else set to None after each step, allocated again in backward
    if not c.offload and kept:
        plan.parts.append(
            Part(
                name,
                "gradients",
                grads,
                f"{trainable:.3g} × {grad_bytes} B / {g_div}" + (" × 2" if z == 3 else ""),
            )
        )
    if z >= 1:  # ZeRO's reduce (and all-gather) buckets; our configs cap them at the trainable count
        buckets = (1 if z == 3 else 2) * min(5e8, trainable) * b
        plan.parts.append(
            Part(name, "ZeRO buckets", buckets, f"{1 if z == 3 else 2} × min(5e8, {trainable:.3g}) × {b} B")
        )
    temps = (
        0.0 if c.offload else 4 * trainable / o_div
    )  # torch's AdamW (foreach): one fp32 temporary per parameter
    save = p * b * (2 if c.lora_dim else 1) if z < 3 else 2 * p / shape.layers * b  # LoRA: merged into a copy
    return {"optimizer step": (0.0 if (kept or c.offload) else grads) + temps, "save": save}


def _frozen(
    plan: StepPlan, name: str, shape: Shape, c: Setup, n: int, b: int, *, offloadable: bool = True
) -> None:
    div = n if c.zero_stage == 3 else 1
    if offloadable and c.offload_frozen:
        plan.host_bytes_per_node += shape.params * b
        plan.parts.append(
            Part(name, "weights (frozen)", 0.0, f"offloaded: {shape.params:.3g} × {b} B in host memory")
        )
    else:
        plan.parts.append(
            Part(name, "weights (frozen)", shape.params * b / div, f"{shape.params:.3g} × {b} B / {div}")
        )


def _merge(phases: dict[str, float], more: dict[str, float], who: str) -> None:
    for k, v in more.items():
        phases[f"{who} {k}" if who else k] = max(phases.get(f"{who} {k}" if who else k, 0.0), v)


def plan_step(
    w: Workload,
    actor: Shape,
    reward: Shape | None,
    c: Setup,
    *,
    gpus: int,
    gpus_per_node: int = 8,
    gpu_bytes: float | None = None,
    host_bytes: float | None = None,
) -> StepPlan:
    """The bytes per GPU of one step under one choice (`host_bytes`: host memory per node for offload):
    what stays resident, plus the largest of the step's phases."""
    n, b = gpus, w.dtype_bytes
    w = replace(
        w,
        micro_batch=max(1, w.micro_batch // c.split),
        generation_batch=max(1, w.generation_batch // c.split),
        accumulation=w.accumulation * c.split,
    )
    plan = StepPlan(method=w.method, choice=c, gpus=n, gpu_bytes=gpu_bytes, host_bytes=host_bytes)
    ck = c.gradient_checkpointing
    phases: dict[str, float] = {}
    if w.method in ("sft", "reward", "dpo"):
        model = reward if (w.method == "reward" and reward is not None) else actor
        name = "reward model" if w.method == "reward" else "actor"
        lm = w.method != "reward"  # a reward model has a value head: no vocabulary-sized logits
        _merge(phases, _trained(plan, name, model, c, n, b, accumulation=w.accumulation), "")
        batch = w.micro_batch * (2 if w.method in ("dpo", "reward") else 1)  # chosen and rejected together
        if w.method == "dpo":
            _frozen(plan, "reference", actor, c, n, b)
            phases["reference forward"] = batch * w.seq_len * actor.vocab * logit_bytes(b)
        act, formula = activations(model, batch=batch, seq=w.seq_len, b=b, checkpointing=ck, logits=lm)
        tail = backward_tail(model, batch=batch, seq=w.seq_len, b=b) if lm else 0.0
        plan.activations_without_checkpointing = activations(
            model, batch=batch, seq=w.seq_len, b=b, checkpointing=False, logits=lm
        )[0]
        plan.activations_with_checkpointing = activations(
            model, batch=batch, seq=w.seq_len, b=b, checkpointing=True, logits=lm
        )[0]
        phases["training"] = act + tail
        plan.parts.append(
            Part(
                name, "activations", act + tail, formula + (" + the backward's first gradients" if lm else "")
            )
        )
    else:
        critic = w.method == "ppo"
        if critic and reward is None:
            raise PlanError(
                "reward_model: ppo trains a critic from the reward model; "
                "give one (or use grpo with a grader)"
            )
        _merge(phases, _trained(plan, "actor", actor, c, n, b, accumulation=w.accumulation), "actor")
        _frozen(plan, "reference", actor, c, n, b)
        if w.ema:
            _frozen(plan, "actor EMA", actor, c, n, b, offloadable=False)
        if critic and reward is not None:
            _merge(
                phases,
                _trained(plan, "critic", reward, replace(c, lora_dim=0), n, b, accumulation=w.accumulation),
                "critic",
            )
        if reward is not None and w.reward_model:
            _frozen(plan, "reward model", reward, c, n, b)
        seq = w.prompt_len + w.answer_len
        gen_batch = w.generation_batch * w.samples_per_prompt
        kv = float(2 * actor.layers * gen_batch * seq * actor.kv_hidden * b)
        plan.parts.append(
            Part(
                "actor",
                "KV cache (generation)",
                kv,
                f"2 × {actor.layers} layers × {gen_batch} seq × {seq} tok × {actor.kv_hidden} × {b} B",
            )
        )
        if w.hybrid_engine and c.zero_stage == 3:  # the hybrid engine gathers the whole actor to generate
            tp = w.inference_tp_size
            gathered = max(actor.params * b / tp - (0 if c.offload else actor.params * b / n), 0.0)
            kv += gathered
            plan.parts.append(
                Part(
                    "actor",
                    "gathered for generation (HE)",
                    gathered,
                    f"{actor.params:.3g} × {b} B / TP {tp}, less the resident shard",
                )
            )
        phases["generation"] = kv + gen_batch * actor.vocab * 4
        scored = w.answer_len + 1  # log-probs of the answer only (the LM head runs over those positions)
        scoring = gen_batch * scored * actor.vocab * logit_bytes(b)  # the actor's, then the reference's
        phases["experience"] = scoring
        plan.parts.append(
            Part(
                "actor+reference",
                "log-probs of the experience",
                scoring,
                f"{gen_batch} × {scored} × {actor.vocab} × {logit_bytes(b)} B",
            )
        )
        act_a, f_a = activations(actor, batch=w.micro_batch, seq=seq, b=b, checkpointing=ck, scored=scored)
        act_a += backward_tail(actor, batch=w.micro_batch, seq=scored, b=b)
        plan.activations_without_checkpointing = activations(
            actor, batch=w.micro_batch, seq=seq, b=b, checkpointing=False
        )[0]
        plan.activations_with_checkpointing = activations(
            actor, batch=w.micro_batch, seq=seq, b=b, checkpointing=True
        )[0]
        phases["actor training"] = act_a
        plan.parts.append(
            Part("actor", "activations (training)", act_a, f_a + " + the backward's first gradients")
        )
        if critic and reward is not None:
            act_c, f_c = activations(
                reward, batch=w.micro_batch, seq=seq, b=b, checkpointing=ck, logits=False
            )
            phases["critic training"] = act_c
            plan.parts.append(Part("critic", "activations (training)", act_c, f_c))
    if (
        c.zero_stage == 3
    ):  # the layers being gathered, and the prefetch bucket (5e7 elements, capped by the model)
        big = max(
            [actor] + ([reward] if reward is not None and w.method != "sft" else []), key=lambda m: m.params
        )
        working = (2 * big.params / big.layers + min(5e7, big.params)) * b
        plan.parts.append(
            Part(
                big.name or "largest model",
                "ZeRO-3 working set",
                working,
                f"(2 layers + min(5e7, P) prefetch) × {b} B",
            )
        )
    phase_parts = ("activations", "KV", "log-probs", "gathered for generation")
    plan.static_bytes = sum(p.bytes for p in plan.parts if not any(k in p.what for k in phase_parts))
    if gpu_bytes is not None:  # the save gathers CPU copies: host memory, not the GPU's
        phases = {k: v for k, v in phases.items() if not k.endswith("save")}
    plan.phase_bytes = phases
    plan.peak_phase = max(phases, key=lambda k: phases[k])
    overhead = GPU_OVERHEAD if gpu_bytes is not None else 0.0
    plan.total_bytes = (plan.static_bytes + phases[plan.peak_phase]) * FRAGMENTATION + overhead
    plan.host_bytes_per_node *= min(gpus, gpus_per_node)
    return plan


def choices(
    method: str, gpus: int, *, lora_rank: int = LORA_RANK, offload: bool = True, micro_batch: int = 1
) -> list[Setup]:
    """Every configuration worth planning (`offload=False`: no optimizer, parameter or frozen-model
    offload)."""
    out = []
    frozen = (False, True) if method in ("dpo", "ppo", "grpo", "rloo") and offload else (False,)
    offloads = (False, True) if offload else (False,)
    for zero, off, lora, ck, fr in itertools.product(
        (0, 1, 2, 3), offloads, (0, lora_rank), (False, True), frozen
    ):
        if (off and zero == 0) or (fr and zero != 3):  # offload needs ZeRO; frozen offload is ZeRO-3 offload
            continue
        if method == "reward" and lora:  # the reward model trains in full in step 2
            continue
        split = 1
        # the micro-batch halved down to 1 sequence, the accumulation doubled to keep the batch
        while True:  # bounded: by the halving
            out.append(Setup(zero, off, lora, ck, fr, split))
            if split * 2 > micro_batch:
                break
            split *= 2
    return out


@dataclass
class Plan:
    workload: Workload
    best: StepPlan | None
    smallest: StepPlan  # the least memory of all choices (what a no-fit is measured against)
    considered: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": asdict(self.workload),
            "fits": self.best is not None,
            "considered": self.considered,
            "plan": self.best.to_dict() if self.best else None,
            "smallest": self.smallest.to_dict(),
        }


def plan(
    w: Workload,
    actor: Shape,
    reward: Shape | None,
    *,
    gpus: int = 1,
    gpus_per_node: int = 8,
    gpu_bytes: float | None = None,
    host_bytes: float | None = None,
    fixed: Setup | None = None,
    allowed: Any = None,
    lora_rank: int = LORA_RANK,
    offload: bool = True,
) -> Plan:
    """The fastest choice that fits (`best`, None if none does) and the smallest footprint."""
    if w.method not in METHODS:
        raise PlanError(f"method: {w.method!r} is not one of {', '.join(METHODS)}")
    if gpus < 1:
        raise PlanError("num_gpus: must be at least 1")
    options = (
        [fixed]
        if fixed
        else [
            c
            for c in choices(w.method, gpus, lora_rank=lora_rank, offload=offload, micro_batch=w.micro_batch)
            if allowed is None or allowed(c)
        ]
    )
    if not options:
        raise PlanError("no configuration is left to plan: the options you fixed rule every one out")
    if host_bytes is None and gpu_bytes is not None:
        host_bytes = HOST_GIB_PER_GPU * GiB * min(gpus, gpus_per_node)
    plans = [
        plan_step(
            w,
            actor,
            reward,
            c,
            gpus=gpus,
            gpus_per_node=gpus_per_node,
            gpu_bytes=gpu_bytes,
            host_bytes=host_bytes,
        )
        for c in options
    ]
    fitting = [p for p in plans if p.fits]
    best = max(fitting, key=lambda p: (p.choice.speed(), -p.total_bytes)) if fitting else None
    return Plan(
        workload=w, best=best, smallest=min(plans, key=lambda p: p.total_bytes), considered=len(plans)
    )


def smallest_fit(
    w: Workload,
    actor: Shape,
    reward: Shape | None,
    *,
    gpu_type: str,
    gpus: int,
    memory: dict[str, float] | None = None,
) -> str:
    """What would fit instead, said plainly: more GPUs of this type, or a larger GPU type (`memory`: GiB
    per GPU type, default gpu_catalogue.MEMORY_GIB)."""
    table = memory or gpu_catalogue.MEMORY_GIB
    own = table[gpu_type]
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512):
        if n <= gpus:
            continue
        p = plan(w, actor, reward, gpus=n, gpu_bytes=own * GiB).best
        if p is not None:
            bigger = [
                g
                for g, mem in sorted(table.items(), key=lambda kv: kv[1])
                if mem > own and plan(w, actor, reward, gpus=gpus, gpu_bytes=mem * GiB).best
            ]
            alt = f", or {gpus}× {bigger[0]}" if bigger else ""
            return f"{n}× {gpu_type} ({p.choice.describe()}){alt}"
    return "no configuration of up to 512 GPUs of this type; use a smaller model or a larger GPU"


def render(p: Plan, *, gpu_label: str) -> str:
    """The plan as a person reads it: the choice, then each line of arithmetic."""
    shown = p.best or p.smallest
    lines = [
        f"{p.workload.method} on {shown.gpus}× {gpu_label}: "
        + (
            f"fits with {shown.choice.describe()} — {_gib(shown.total_bytes)} per GPU"
            + (f", {_gib(shown.headroom_bytes or 0)} headroom" if shown.gpu_bytes else "")
            + f" (relative speed {shown.choice.speed():.2f}; {p.considered} configurations considered)"
            if p.best
            else f"DOES NOT FIT: the smallest footprint ({shown.choice.describe()}) needs "
            f"{_gib(shown.total_bytes)} per GPU of {_gib(shown.gpu_bytes or 0)}"
        )
    ]
    for part in shown.parts:
        lines.append(f"  {part.model:<16} {part.what:<30} {_gib(part.bytes):>12}   {part.formula}")
    phases = ", ".join(f"{k} {_gib(v)}" for k, v in shown.phase_bytes.items())
    lines.append(
        f"  peak = (resident {_gib(shown.static_bytes)} + largest phase: {shown.peak_phase}) "
        f"× {FRAGMENTATION}"
        + (f" + {_gib(GPU_OVERHEAD)} GPU overhead" if shown.gpu_bytes else "")
        + f" = {_gib(shown.total_bytes)}"
    )
    lines.append(f"  phases: {phases}")
    lines.append(
        f"  activations: {_gib(shown.activations_without_checkpointing)} without gradient checkpointing, "
        f"{_gib(shown.activations_with_checkpointing)} with"
    )
    if shown.host_bytes_per_node:
        lines.append(f"  host memory per node for offload: {_gib(shown.host_bytes_per_node)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- a step's options ↔ the plan


def step_configs(
    top: dict[str, Any], sections: dict[str, dict[str, Any]], *, method: str, actor: str, reward: str
) -> list[tuple[int, str, Any]]:
    """(step, planner method, the step's built config) for each step of `method` (rlhf, dpo, grpo, rloo, or
    one step: sft, reward, ppo), from a pipeline file's values (a preset's, the service's)."""
    import argparse

    from rlhf_engine.config.args import dataclass_from_args
    from rlhf_engine.config.pipeline import RUNS, STEPS, PipelineConfig, step_values

    run = RUNS[method]
    pipeline_method, steps, algorithm = run.table, list(run.steps), run.algorithm
    if algorithm:
        sections["ppo"] = {**sections.get("ppo", {}), "algorithm": algorithm}
        if algorithm != "ppo":
            sections["ppo"].setdefault("samples_per_prompt", 4)
    cfg = dataclass_from_args(
        PipelineConfig,
        argparse.Namespace(),
        file_values={
            **top,
            "actor_model": actor,
            "reward_model": reward or "",
            "output_dir": "plan",
            "method": pipeline_method,
            "step": steps,
        },
    )
    out = []
    for step in steps:
        spec = STEPS[pipeline_method][step]
        values = step_values(cfg, step, sections.get(spec.command, {}))
        if step == 3 and not reward:  # graders only
            values |= {
                "critic_model_name_or_path": "",
                "grader": '{"type": "string_check", "name": "planned", '
                '"input": "{{sample.output_text}}", "reference": "x", "operation": "eq"}',
            }
        built: Any = dataclass_from_args(spec.config, argparse.Namespace(), file_values=values)
        out.append(
            (step, built.algorithm if step == 3 and pipeline_method == "rlhf" else spec.command, built)
        )
    return out


MEMORY_FIELDS = ("zero_stage", "offload", "lora_dim", "only_optimize_lora", "gradient_checkpointing")
FROZEN_FIELDS = ("offload_reference_model", "offload_reward_model")


def workload_of(cfg: Any, method: str, *, dtype_bytes: int = 2) -> Workload:
    """The workload of a built step config (SFTConfig, RewardConfig, DPOConfig, PPOConfig)."""
    data = cfg.data
    if method in ("sft", "reward", "dpo"):
        return Workload(
            method=method,  # type: ignore[arg-type]
            seq_len=data.max_seq_len,
            micro_batch=cfg.per_device_train_batch_size,
            accumulation=cfg.gradient_accumulation_steps,
            dtype_bytes=dtype_bytes,
        )
    return Workload(
        method=cfg.algorithm,
        prompt_len=data.max_prompt_len,
        answer_len=cfg.max_answer_len,
        micro_batch=cfg.per_device_training_batch_size,
        generation_batch=cfg.per_device_generation_batch_size,
        samples_per_prompt=cfg.samples_per_prompt,
        dtype_bytes=dtype_bytes,
        ema=cfg.enable_ema,
        reward_model=not cfg.grader,
        hybrid_engine=cfg.enable_hybrid_engine,
        accumulation=cfg.gradient_accumulation_steps,
        generation_batches=cfg.generation_batches,
    )


def choice_of(cfg: Any, method: str) -> Setup:
    """The configuration a built step config asks for."""
    m = cfg.actor if method not in ("sft", "reward", "dpo") else cfg.model
    frozen = bool(
        getattr(cfg, "offload_reference_model", False) or getattr(cfg, "offload_reward_model", False)
    )
    return Setup(
        zero_stage=m.zero_stage,
        offload=m.offload,
        lora_dim=m.lora_dim if m.only_optimize_lora else 0,
        gradient_checkpointing=m.gradient_checkpointing,
        offload_frozen=frozen,
    )


def step_options(c: Setup, method: str, w: Workload | None = None) -> dict[str, Any]:
    """The flat step options (flags without dashes) that apply a choice (a split needs the
    workload's batches)."""
    base = c.model_options()
    split: dict[str, Any] = {}
    if c.split > 1 and w is not None:
        if method in ("sft", "reward", "dpo"):
            split = {
                "per_device_train_batch_size": max(1, w.micro_batch // c.split),
                "gradient_accumulation_steps": w.accumulation * c.split,
            }
        else:
            split = {
                "per_device_training_batch_size": max(1, w.micro_batch // c.split),
                "gradient_accumulation_steps": w.accumulation * c.split,
                "per_device_generation_batch_size": max(1, w.generation_batch // c.split),
                "generation_batches": w.generation_batches * c.split,
            }
    if method in ("sft", "reward", "dpo"):
        out = dict(base)
        if method == "dpo":
            out["offload_reference_model"] = c.offload_frozen
        return out | split
    out = {f"actor_{k}": v for k, v in base.items()}
    out |= {f"critic_{k}": v for k, v in base.items() if k not in ("lora_dim", "only_optimize_lora")}
    out |= {"offload_reference_model": c.offload_frozen, "offload_reward_model": c.offload_frozen}
    return out | split


def as_flags(options: dict[str, Any]) -> str:
    """Step options as the step command's flags (booleans as --x / --no-x)."""
    flag = lambda k: k.replace("_", "-")  # noqa: E731
    return " ".join(
        (f"--{flag(k)}" if v else f"--no-{flag(k)}") if isinstance(v, bool) else f"--{flag(k)} {v}"
        for k, v in options.items()
    )


def allowed_by(fixed: dict[str, Any], method: str) -> Any:
    """A filter of choices that keeps what the caller set explicitly (flat step options)."""
    want = {
        k.removeprefix("actor_"): v
        for k, v in fixed.items()
        if k.removeprefix("actor_") in MEMORY_FIELDS or k in FROZEN_FIELDS
    }

    batches = {
        "per_device_train_batch_size",
        "per_device_training_batch_size",
        "per_device_generation_batch_size",
        "gradient_accumulation_steps",
        "generation_batches",
    } & set(fixed)

    def ok(c: Setup) -> bool:
        if batches and c.split > 1:  # the caller chose the batches
            return False
        opts = step_options(c, method)
        for k, v in want.items():
            if k == "lora_dim" and not want.get("only_optimize_lora"):
                if c.lora_dim:  # adapters beside full training: planned as full training
                    return False
                continue
            key = k if (k in FROZEN_FIELDS or method in ("sft", "reward", "dpo")) else f"actor_{k}"
            if opts.get(key, False) != v:
                return False
        return True

    return ok


def step_models(command: str, cfg: Any, actor: Shape, reward: Shape | None) -> tuple[Shape, Shape | None]:
    """The models a step trains or runs, as the planner sees them: (the trained one, the other or None).
    Step 2 trains the reward model; SFT, DPO and a step 3 scored by a grader have no reward model."""
    if command == "reward":
        return reward or actor, reward or actor
    if command in ("sft", "dpo") or (command == "ppo" and cfg.grader):
        return actor, None
    return actor, reward


def dtype_bytes(cfg: Any, command: str, *, gpu: bool) -> int:
    """Bytes per weight of a step's models: 4 on a CPU (fp32; bf16 saves nothing there) and when the
    step's config says fp32, else 2 (bf16 / fp16)."""
    model_dtype = (cfg.actor if command == "ppo" else cfg.model).dtype
    return 4 if (not gpu or model_dtype == "fp32") else 2


def step_workload(cfg: Any, command: str, *, gpu: bool) -> Workload:
    """The workload of a built step config (`command`: sft, reward, dpo or ppo — step 3's algorithm
    read from the config) on a GPU or a CPU: what `--config auto` and the service's estimate plan."""
    method = cfg.algorithm if command == "ppo" else command
    return workload_of(cfg, method, dtype_bytes=dtype_bytes(cfg, command, gpu=gpu))


def auto_options(
    cfg: Any,
    command: str,
    *,
    gpus: int,
    device_bytes: float,
    cuda: bool,
    fixed: dict[str, Any],
    shapes: tuple[Shape, Shape | None] | None = None,
) -> tuple[dict[str, Any], Plan]:
    """`--config auto`: the step options of the fastest configuration that fits a built step config on this
    machine (`fixed`: the options given on the command line, kept; `shapes`: the models when the step's
    inputs do not exist yet, as in `rlhf train`). On a CPU the "GPU" is the host memory and offload gains
    nothing."""
    method = cfg.algorithm if command == "ppo" else command
    if shapes is not None:
        actor, reward = step_models(command, cfg, *shapes)
    elif command in ("sft", "dpo"):
        actor, reward = load_shape(cfg.model_name_or_path, name="actor"), None
    elif command == "reward":
        actor = reward = load_shape(cfg.model_name_or_path, name="reward model")
    else:
        actor = load_shape(cfg.actor_model_name_or_path, name="actor")
        critic = cfg.reward_model_name_or_path or cfg.critic_model_name_or_path
        reward = load_shape(critic, name="reward model") if critic and not cfg.grader else None
    w = step_workload(cfg, command, gpu=cuda)
    p = plan(
        w,
        actor,
        reward,
        gpus=gpus,
        gpus_per_node=gpus,
        gpu_bytes=device_bytes,
        offload=cuda,
        allowed=allowed_by(fixed, method),
    )
    if p.best is None:
        return {}, p
    return {k: v for k, v in step_options(p.best.choice, method, w).items() if k not in fixed}, p


# ---------------------------------------------------------------------------- DeepSpeed-Chat's tables

# What DeepSpeed-Chat published about step 3 (OPT actor, OPT-350M reward model; its README's Table 1 times
# and the blog's Table 3, "max model size supported by DeepSpeed-HE on a single GPU"): True = a time was
# published (it ran), False = not ("NA", or larger than the single-GPU maximum).
DSCHAT_HARDWARE = [
    ("1× V100-32G", "V100-32G", 1),
    ("1× A6000-48G", "A6000-48G", 1),
    ("1× A100-40G", "A100-40G", 1),
    ("1× A100-80G", "A100-80G", 1),
    ("8× A100-40G", "A100-40G", 8),
    ("8× A100-80G", "A100-80G", 8),
    ("64× A100-80G", "A100-80G", 64),
]
DSCHAT_SIZES = [1.3e9, 2.7e9, 6.7e9, 13e9, 30e9, 66e9, 175e9]
DSCHAT_PUBLISHED: dict[str, dict[float, bool | None]] = {
    # single GPU: Table 3's maximum (V100 2.7B, A6000 6.7B, A100-40G 6.7B, A100-80G 13B); None: not stated
    "1× V100-32G": {
        1.3e9: True,
        2.7e9: True,
        6.7e9: False,
        13e9: False,
        30e9: False,
        66e9: False,
        175e9: False,
    },
    "1× A6000-48G": {
        1.3e9: True,
        2.7e9: True,
        6.7e9: True,
        13e9: False,
        30e9: False,
        66e9: False,
        175e9: False,
    },
    "1× A100-40G": {
        1.3e9: True,
        2.7e9: True,
        6.7e9: True,
        13e9: False,
        30e9: False,
        66e9: False,
        175e9: False,
    },
    "1× A100-80G": {
        1.3e9: True,
        2.7e9: True,
        6.7e9: True,
        13e9: True,
        30e9: False,
        66e9: False,
        175e9: False,
    },
    # 8 GPUs: Table 1 has times up to 30B on A100-40G (66B: "NA") and up to 66B on A100-80G
    "8× A100-40G": {1.3e9: True, 2.7e9: None, 6.7e9: True, 13e9: True, 30e9: True, 66e9: False, 175e9: None},
    "8× A100-80G": {1.3e9: True, 2.7e9: None, 6.7e9: True, 13e9: True, 30e9: True, 66e9: True, 175e9: None},
    "64× A100-80G": {1.3e9: True, 2.7e9: None, 6.7e9: True, 13e9: True, 30e9: True, 66e9: True, 175e9: True},
}


def dschat_workload() -> Workload:
    """DeepSpeed-Chat's step-3 benchmark: 256-token prompts and answers, 4 sequences per GPU, EMA off,
    the hybrid engine on (generation holds the whole actor)."""
    return Workload(
        method="ppo", prompt_len=256, answer_len=256, micro_batch=4, generation_batch=4, hybrid_engine=True
    )


def dschat_table() -> list[dict[str, Any]]:
    """Each (hardware, OPT size): DeepSpeed-Chat's published answer, ours under the settings of its scripts
    (ZeRO 0-3, LoRA 128, gradient checkpointing, the hybrid engine with the smallest inference TP group that
    fits; no offload of any kind: its scripts pass neither --offload nor --offload_reference_model), and
    ours with every choice (offload too, our generation path without the hybrid engine)."""
    reward = Shape.from_params(0.35e9, name="reward model")
    rows = []
    for label, gpu, n in DSCHAT_HARDWARE:
        for size in DSCHAT_SIZES:
            actor = Shape.from_params(size, name="actor")
            mem = gpu_catalogue.MEMORY_GIB[gpu] * GiB
            for tp in (
                t for t in (1, 2, 4, 8) if t <= min(n, 8)
            ):  # the smallest tensor-parallel group that fits
                theirs = plan(
                    replace(dschat_workload(), inference_tp_size=tp),
                    actor,
                    reward,
                    gpus=n,
                    gpu_bytes=mem,
                    lora_rank=128,
                    offload=False,
                )
                if theirs.best is not None:
                    break
            any_ = plan(replace(dschat_workload(), hybrid_engine=False), actor, reward, gpus=n, gpu_bytes=mem)
            rows.append(
                {
                    "hardware": label,
                    "actor_params": size,
                    "published": DSCHAT_PUBLISHED[label][size],
                    "dschat_settings": theirs.best is not None,
                    "dschat_choice": (
                        theirs.best.choice.describe() + (f", inference TP {tp}" if tp > 1 else "")
                    )
                    if theirs.best
                    else "",
                    "any_choice": any_.best is not None,
                    "any_choice_config": any_.best.choice.describe() if any_.best else "",
                }
            )
    return rows


def dschat_markdown() -> str:
    """The table of docs/planning.md: DeepSpeed-Chat's published answer beside the planner's (generated,
    then checked against that page by a test)."""
    rows = dschat_table()
    mark = {True: "fits", False: "—", None: "n/a"}
    sizes = [f"{s / 1e9:g}B" for s in DSCHAT_SIZES]
    out = ["| hardware | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label, _, _ in DSCHAT_HARDWARE:
        cells = []
        for r in (r for r in rows if r["hardware"] == label):
            ours, pub = r["dschat_settings"], r["published"]
            cell = f"{mark[pub]} / {mark[ours]}" + ("" if pub is None or pub == ours else " ≠")
            cells.append(
                cell + (f" ({mark[r['any_choice']]} with offload)" if r["any_choice"] != ours else "")
            )
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    agree = sum(r["published"] == r["dschat_settings"] for r in rows if r["published"] is not None)
    known = sum(r["published"] is not None for r in rows)
    out.append(f"\n{agree} of {known} published answers agree.")
    return "\n".join(out)
