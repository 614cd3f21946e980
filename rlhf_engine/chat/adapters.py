"""Many LoRA adapters on one base model, applied per row inside one batch (S-LoRA / Punica style).

Every linear layer some resident adapter adapts is wrapped once (`LoRALinear`): the base matmul runs
for the whole batch, then each row's low-rank update is added by the adapter that row uses. Before a
forward pass the generator says which adapter each row uses (`AdapterBank.plan`); the adapters present
in the batch are laid side by side per layer (A: (Σr, in), B: (out, Σr), scaling folded into B), so a
layer's update is two small matmuls for the whole batch and a mask that keeps each row's own block:

    y = base(x) + ((x · Aᵀ) ⊙ mask_rows) · Bᵀ

Rows of the bare base have an empty mask. The side-by-side weights are built once per set of adapters
present (a decode step reuses the last step's) — the torch path, used on every device; a fused kernel
(Punica's BGMV/SGMV in vLLM, S-LoRA's) would skip the mask's wasted columns on a GPU.

Adapters stay resident up to a byte budget, least recently used evicted first, never one a running or
queued request uses.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_engine.chat.errors import ModelLoadError
from rlhf_engine.models.adapter import KEY_RE, WEIGHTS, AdapterError, check_adapter

logger = logging.getLogger(__name__)


@dataclass
class Adapter:
    key: str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (A (r, in), B·scaling (out, r))
    bytes: int
    pins: int = 0  # requests queued or running with it


class LoRALinear(nn.Module):
    """A base linear layer plus the low-rank update of each row's adapter (see the module's docstring)."""

    def __init__(self, base: nn.Module, name: str, bank: AdapterBank) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self._bank = [bank]  # a list: the bank is not a submodule (no state dict, no .to())

    @property
    def weight(self) -> Any:  # what code reading the layer's weight expects (tied heads, dtype probes)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self._bank[0].plan
        if plan is None:
            return y
        ab = plan.layer(self.name)
        if ab is None:
            return y
        a, b = ab
        h = F.linear(x, a)  # (rows, T, Σr), or (rows·T, Σr) where a model flattens (OPT's MLP)
        if not plan.uniform:  # each row keeps its own adapter's block (in place: h is fresh)
            rows = h.view(plan.mask.shape[0], -1, h.shape[-1])
            rows.masked_fill_(plan.drop.unsqueeze(1), 0.0)  # (not a multiply: another's inf × 0 is NaN)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t())  # y is fresh too: one fused op
        return y


class Plan:
    """One forward pass's adapters: which are present, each row's mask over their side-by-side ranks."""

    def __init__(self, bank: AdapterBank, present: tuple[str, ...], rows: list[str | None]) -> None:
        self.bank = bank
        self.present = present
        offsets, start = {}, 0
        for key in present:
            offsets[key] = start
            start += bank.ranks[key]
        self.mask = torch.zeros(len(rows), start, dtype=bank.dtype, device=bank.device)
        for i, row in enumerate(rows):
            if row is not None:
                self.mask[i, offsets[row] : offsets[row] + bank.ranks[row]] = 1
        self.drop = self.mask == 0  # the columns each row must not see
        self.uniform = len(present) == 1 and None not in rows  # every row the same adapter: no mask

    def layer(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.bank.side_by_side(self.present, name)


class AdapterBank:
    """The adapters resident on one base model, and the wrapped layers that apply them."""

    def __init__(self, module: nn.Module, base_dir: Path, budget_bytes: int) -> None:
        self.module = module
        self.base_dir = base_dir
        self.budget = budget_bytes
        self.adapters: OrderedDict[str, Adapter] = OrderedDict()  # least recently used first
        self.ranks: dict[str, int] = {}
        self.plan: Plan | None = None
        self.lock = threading.RLock()  # held by the scheduler for a forward pass and by add/evict
        # pins and membership: never held across a forward pass, so a request's pin (taken on the
        # worker's event loop) never waits for one; an eviction takes both locks
        self._pins = threading.Lock()
        self._wrapped: dict[str, LoRALinear] = {}
        # the present adapters' layers side by side, per set of adapters (least recently used first)
        self._joined: OrderedDict[tuple[str, ...], dict[str, tuple[torch.Tensor, torch.Tensor] | None]] = (
            OrderedDict()
        )
        self._joined_bytes: dict[tuple[str, ...], int] = {}
        ref = next(module.parameters())
        self.dtype, self.device = ref.dtype, ref.device

    def __contains__(self, key: str) -> bool:
        return key in self.adapters

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.adapters.values())

    def resident(self) -> list[str]:
        with self._pins:
            return list(self.adapters)

    def load(self, key: str, folder: Path) -> None:
        """Make adapter `key` (a PEFT folder) resident: checked against the base, read, its layers wrapped;
        least recently used idle adapters evicted beyond the budget. `ModelLoadError` names what is wrong."""
        from safetensors.torch import load_file

        with self.lock:
            if key in self.adapters:
                self.adapters.move_to_end(key)
                return
        try:
            spec = check_adapter(folder, self.base_dir)
        except AdapterError as e:
            raise ModelLoadError(f"model: {e}", param="model") from None
        try:
            tensors = load_file(str(folder / WEIGHTS), device="cpu")
        except Exception as e:  # a file its header misdescribes (truncated, bad offsets)
            raise ModelLoadError(f"model: {WEIGHTS}: cannot be read ({e})", param="model") from None
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            m = KEY_RE.fullmatch(name)
            assert m is not None  # check_adapter read the same keys
            parts.setdefault(m["module"], {})[m["part"]] = t
        modules = dict(self.module.named_modules())
        weights = {}
        for name, ab in parts.items():
            target = name if name in modules else name.split(".", 1)[1]
            layer = modules.get(target)
            if isinstance(layer, LoRALinear):  # wrapped for an adapter loaded before
                layer = layer.base
            a = ab["A"].to(self.device, self.dtype)
            b = (ab["B"].float() * spec.scaling[name]).to(self.device, self.dtype)
            if not _linear(layer) or _features(layer) != (b.shape[0], a.shape[1]):  # type: ignore[arg-type]
                raise ModelLoadError(
                    f"model: {WEIGHTS}: {name} is not a linear layer of the base mapping {a.shape[1]} → "
                    f"{b.shape[0]} features",
                    param="model",
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # (NaN × 0 is NaN: other rows)
                raise ModelLoadError(
                    f"model: {WEIGHTS}: {name} holds values that are not finite in {self.dtype}",
                    param="model",
                )
            weights[target] = (a, b)
        adapter = Adapter(
            key=key, weights=weights, bytes=sum(a.nbytes + b.nbytes for a, b in weights.values())
        )
        with self.lock:
            if key in self.adapters:  # loaded meanwhile by another request: keep that one (and its pins)
                self.adapters.move_to_end(key)
                return
            for name in weights:
                self._wrap(name, modules)
            with self._pins:
                self.adapters[key] = adapter
                self.ranks[key] = max(a.shape[0] for a, _ in weights.values())
            self._forget_joined()
            self._evict(keep=key)
        logger.info("adapter %s resident (%d layers, %.1f MB)", key, len(weights), adapter.bytes / 2**20)

    def _wrap(self, name: str, modules: dict[str, nn.Module]) -> None:
        if name in self._wrapped:
            return
        layer = modules[name]
        if isinstance(layer, LoRALinear):
            return
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else self.module
        wrapper = LoRALinear(layer, name, self)
        setattr(parent, child, wrapper)
        self._wrapped[name] = wrapper

    def _evict(self, keep: str | None = None) -> None:
        """Idle adapters beyond the budget, least recently used first (call with `lock` held)."""
        with self._pins:
            for key in list(self.adapters):
                if self.bytes <= self.budget:
                    break
                if key != keep and self.adapters[key].pins == 0:
                    logger.info(
                        "evicting adapter %s (least recently used; budget %.0f MB)", key, self.budget / 2**20
                    )
                    del self.adapters[key]
                    self.ranks.pop(key, None)
                    self._forget_joined()

    def pin(self, key: str) -> None:
        """A request will use `key` (it stays resident until `unpin`); never waits for a forward pass."""
        with self._pins:
            adapter = self.adapters.get(key)
            if adapter is None:
                raise ModelLoadError(f"model: adapter {key} is not loaded on this worker", param="model")
            adapter.pins += 1
            self.adapters.move_to_end(key)

    def unpin(self, key: str) -> None:
        """The request ended; an adapter beyond the budget goes at the next load."""
        with self._pins:
            adapter = self.adapters.get(key)
            if adapter is not None:
                adapter.pins = max(0, adapter.pins - 1)

    def use(self, rows: list[str | None]) -> None:
        """The adapter of each row of the next forward pass (call with the lock held; `None`: the base)."""
        present = tuple(sorted({k for k in rows if k is not None}))
        self.plan = Plan(self, present, rows) if present else None

    def side_by_side(self, present: tuple[str, ...], name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer `name`'s A and B of the adapters `present`, side by side (zeros where one leaves it
        alone); None when none of them adapts it. One adapter: its own tensors (no copy). Several: a copy,
        kept for the next passes with the same adapters; such copies stay within as many bytes as the
        resident adapters (least recently used set dropped first)."""
        if len(present) == 1:
            ab = self.adapters[present[0]].weights.get(name)
            if ab is None or ab[0].shape[0] == self.ranks[present[0]]:  # (else padded to its widest rank)
                return ab
        joined = self._joined.get(present)
        if joined is None:
            joined = self._joined[present] = {}
            self._joined_bytes[present] = 0
        self._joined.move_to_end(present)
        if name not in joined:
            blocks = []
            for key in present:
                adapter, rank = self.adapters[key], self.ranks[key]
                ab = adapter.weights.get(name)
                layer = self._wrapped[name].base
                out_f, in_f = _features(layer)
                a = ab[0] if ab is not None else torch.zeros(0, in_f, dtype=self.dtype, device=self.device)
                b = ab[1] if ab is not None else torch.zeros(out_f, 0, dtype=self.dtype, device=self.device)
                pad = rank - a.shape[0]  # a lower rank here than the adapter's widest layer: zero columns
                blocks.append((F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))))
            if all(name not in self.adapters[k].weights for k in present):
                joined[name] = None
            else:
                a, b = torch.cat([a for a, _ in blocks]), torch.cat([b for _, b in blocks], dim=1)
                joined[name] = (a, b)
                self._joined_bytes[present] += a.nbytes + b.nbytes
                while sum(self._joined_bytes.values()) > self.bytes and next(iter(self._joined)) != present:
                    oldest = next(iter(self._joined))
                    del self._joined[oldest], self._joined_bytes[oldest]
        return joined[name]

    def _forget_joined(self) -> None:
        self._joined.clear()
        self._joined_bytes.clear()


def _linear(layer: Any) -> bool:
    """A layer whose forward is `x @ Wᵀ (+ b)` on the last dimension: a Linear (torchao's int8 Linear is
    one), or GPT-2's Conv1D; not an embedding, norm or convolution."""
    return isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D"


def _features(layer: nn.Module) -> tuple[int, int]:
    """(out, in) features of a linear layer (GPT-2's Conv1D stores its weight transposed)."""
    w: Any = layer.weight
    if type(layer).__name__ == "Conv1D":
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])
