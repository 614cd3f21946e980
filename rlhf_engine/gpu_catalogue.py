"""The GPU catalogue: every accelerator type the planner, the estimate and the service know, with its
memory, its price and its speed. The one place these figures live; `planner` (memory), the service's
cost model (price, speed) and its settings (which types may be offered) read them from here.

- memory: what nvidia-smi reports (GiB), what the memory planner fits a step into;
- price: USD per GPU-hour. A100-80G's is the one that makes DeepSpeed-Chat's Table 1 add up
  ($290 for 72 GPU-hours); the others are set beside it. A type without a price can be planned
  (`rlhf plan --gpu-type`) but not offered by the service: every job is priced;
- speed: throughput relative to A100-80G (the cost model's calibration), where known.

`cpu` is the host itself: no GPU memory to plan (processes share the machine's memory), its own
throughput constants in the cost model, a price for the service's CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float | None  # None: the host (`cpu`), planned against the machine's memory
    usd_per_hour: float | None  # None: not priced, so not offered by the service
    speed: float | None  # relative to A100-80G; None: not calibrated


CATALOGUE: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("cpu", None, 0.05, None),
        GPU("V100-32G", 32.0, 3.06, 0.35),
        GPU("A100-40G", 40.0, 3.40, 0.9),
        GPU("A6000-48G", 48.0, None, None),
        GPU("A100-80G", 80.0, 4.03, 1.0),
        GPU("H100-80G", 80.0, 6.98, 2.0),
        GPU("H200-141G", 141.0, None, None),
    )
}
# the views the planner and the cost model read (derived: never edit these, edit CATALOGUE)
MEMORY_GIB: dict[str, float] = {n: g.memory_gib for n, g in CATALOGUE.items() if g.memory_gib is not None}
PRICE_PER_HOUR: dict[str, float] = {
    n: g.usd_per_hour for n, g in CATALOGUE.items() if g.usd_per_hour is not None
}
SPEED: dict[str, float] = {n: g.speed for n, g in CATALOGUE.items() if g.speed is not None}
# what the service offers unless configured otherwise: every priced type
OFFERED: tuple[str, ...] = tuple(PRICE_PER_HOUR)


def unpriced(names: list[str]) -> list[str]:
    """The names in `names` the catalogue has no price for (the service cannot offer them)."""
    return [n for n in names if n not in PRICE_PER_HOUR]
