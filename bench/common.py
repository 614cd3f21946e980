"""Helpers shared by the benchmark scripts (run as `python bench/<name>.py`, so this sits beside them)."""

from __future__ import annotations


def pct(xs: list[float], q: float) -> float:
    """The q-quantile of xs (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]
