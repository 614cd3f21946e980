"""Throughput tables, the time/price estimate of a job, and cost accrual (docs/contracts.md §5).

Prices and GPU speeds: rlhf_engine/gpu_catalogue.py.

Throughput model: tokens per second per GPU = K[step][gpu_type] / model size in billions of
parameters (floored at 0.5M parameters for tiny models), plus a fixed start-up per step. Calibration:

- A100-80G, step 3: DeepSpeed-Chat's Table 1 — OPT-13B actor + OPT-350M reward model on 8×A100-80G
  trains 135M tokens in about 9 h for about $290, OPT-30B in about 18 h for about $600. 135M tokens /
  (9 h × 8 GPUs) = 521 tokens/s/GPU at 13B and 260 at 30B → K ≈ 7,200 (our estimate: 8.5 h / $274
  and 19.6 h / $631, both within ±30%); the price that makes $290 of 72 GPU-hours: $4.03/GPU-hour.
- Steps 1 and 2 (no generation, one forward+backward per token) run ≈ 4× step 3's tokens/s.
- cpu: measured on the 2-core CI machine with the tiny `xs` model (0.53M parameters): step 1 12.2K
  tokens/s, step 2 15.7K, step 3 6K (prompt + answer tokens), and ≈ 10 s of start-up per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_engine import gpu_catalogue

K_A100 = {1: 28_800.0, 2: 28_800.0, 3: 7_200.0}  # billion-parameter × tokens/s per GPU
K_CPU = {1: 6.5, 2: 8.3, 3: 3.2}
STARTUP_S = {"cpu": 10.0, "gpu": 120.0}
MIN_PARAMS_B = 0.0005


@dataclass
class StepCost:
    step: int
    tokens: int
    seconds: float
    usd: float


def price(gpu_type: str) -> float:
    return gpu_catalogue.PRICE_PER_HOUR[gpu_type]


def tokens_per_second(step: int, gpu_type: str, params_b: float, num_gpus: int) -> float:
    size = max(params_b, MIN_PARAMS_B)
    if gpu_type == "cpu":
        return K_CPU[step] / size * num_gpus
    return K_A100[step] * gpu_catalogue.SPEED.get(gpu_type, 1.0) / size * num_gpus


def step_cost(step: int, *, tokens: int, params_b: float, gpu_type: str, num_gpus: int) -> StepCost:
    seconds = tokens / tokens_per_second(step, gpu_type, params_b, num_gpus)
    seconds += STARTUP_S["cpu" if gpu_type == "cpu" else "gpu"]
    usd = seconds * num_gpus * price(gpu_type) / 3600
    return StepCost(step=step, tokens=tokens, seconds=seconds, usd=usd)


def budget_exhausted(*, accrued_usd: float, max_cost_usd: float | None, interval_usd: float) -> bool:
    """Whether a job must stop now to stay within max_cost_usd: the step needs up to an interval to
    checkpoint and exit, which is accrued too, so it stops two intervals before the cap."""
    return max_cost_usd is not None and accrued_usd + 2 * interval_usd > max_cost_usd


def interval_usd(seconds: float, *, num_gpus: int, gpu_type: str) -> float:
    """One accrual interval's price: wall seconds × GPUs × price per GPU-hour / 3600."""
    return seconds * num_gpus * price(gpu_type) / 3600


def params_from_config(config: dict[str, object]) -> float:
    """Billions of parameters from a Hugging Face config.json (embeddings + 12·L·H² for the blocks)."""

    def get(*keys: str) -> int:
        for k in keys:
            v = config.get(k)
            if isinstance(v, int) and v > 0:
                return v
        return 0

    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    vocab = get("vocab_size")
    ffn = get("intermediate_size", "ffn_dim", "n_inner") or 4 * hidden
    if not hidden or not layers:
        return MIN_PARAMS_B
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn
    return (layers * per_layer + vocab * hidden) / 1e9
