"""The chat generator's KV storage on its own: the running batch's layer (rows added, moved and dropped,
columns appended and trimmed, storage growing) holds exactly what concatenating and padding would;
the prompt cache reuses the longest common start within a scope, never the whole prompt, and stays
inside its memory bound."""

from __future__ import annotations

import torch

from rlhf_engine.chat.kv import BatchLayer, PrefixCache


def kv(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, cols, 4, generator=g), torch.randn(rows, 3, cols, 4, generator=g)


def padded(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, [0, 0, width - x.shape[2], 0])


def test_batch_layer_matches_concatenation_through_joins_leaves_and_growth() -> None:
    layer = BatchLayer()
    k1, v1 = kv(2, 5, 1)
    layer.add_rows(k1, v1)
    ref_k, ref_v = k1, v1
    for step in range(70):  # past the first allocation (5 + 64 columns): the storage grows, contents kept
        k, v = kv(ref_k.shape[0], 1, 100 + step)
        got_k, got_v = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], 2), torch.cat([ref_v, v], 2)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
        if step == 10:  # narrower rows join: left-padded with zeros to the batch's columns
            k2, v2 = kv(3, 4, 2)
            layer.add_rows(k2, v2)
            w = ref_k.shape[2]
            ref_k, ref_v = torch.cat([ref_k, padded(k2, w)]), torch.cat([ref_v, padded(v2, w)])
        if step == 20:  # a wider row joins: the batch is shifted right, padded on the left
            k3, v3 = kv(1, ref_k.shape[2] + 7, 3)
            layer.add_rows(k3, v3)
            w = k3.shape[2]
            ref_k, ref_v = torch.cat([padded(ref_k, w), k3]), torch.cat([padded(ref_v, w), v3])
        if step == 30:  # row 1 finishes: the last row takes its place
            last = ref_k.shape[0] - 1
            layer.move_row(last, 1)
            layer.truncate(last)
            order = [0, last, *range(2, last)]
            ref_k, ref_v = ref_k[order], ref_v[order]
        if step == 40:  # padding columns every row shares are dropped
            layer.truncate(ref_k.shape[0], lead=3)
            ref_k, ref_v = ref_k[:, :, 3:], ref_v[:, :, 3:]
        assert layer.keys is not None and layer.values is not None, step
        assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v), step
    layer.truncate(0)  # the batch empties; the storage is reused by the next rows
    k4, v4 = kv(2, 3, 4)
    layer.add_rows(k4, v4)
    assert layer.keys is not None and layer.values is not None
    assert torch.equal(layer.keys, k4) and torch.equal(layer.values, v4)


def entry(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(3, n, 4), torch.zeros(3, n, 4))]  # one layer, 96 bytes per token


def test_prefix_cache_longest_common_start_within_scope_and_memory_bound() -> None:
    cache = PrefixCache(max_bytes=96 * 25)
    system = [1, 2, 3, 4, 5, 6]
    cache.add([*system, 10, 11], entry(8), scope="a")
    assert cache.match([*system, 20, 21, 22], "a")[0] == 6  # the shared system prompt
    assert cache.match([*system, 20, 21, 22], "b") == (0, None)  # another tenant's prompt is never reused
    assert cache.match([*system, 10, 11], "a")[0] == 7  # the whole prompt: all but its last token
    assert cache.match([9, *system], "a") == (0, None)
    cache.add([*system, 10, 11, 12, 13], entry(10), scope="a")  # a longer turn replaces the one it extends
    assert len(cache) == 1 and cache.bytes == 96 * 10
    cache.add([*system, 10], entry(7), scope="a")  # already held
    assert len(cache) == 1
    cache.add([7, 7, 7, 7, 7, 7, 7, 7], entry(8), scope="a")
    cache.add([8, 8, 8, 8, 8, 8, 8, 8], entry(8), scope="b")  # over the bound: the least recently used goes
    assert cache.bytes <= 96 * 25 and len(cache) == 2
    assert cache.match([*system, 10, 11, 12, 13, 14], "a") == (0, None)
    assert cache.match([7, 7, 7, 7, 1], "a")[0] == 4
    cache.add(list(range(100)), entry(100), scope="a")  # larger than the whole cache: not kept
    assert cache.match(list(range(100)), "a")[0] == 0
    off = PrefixCache(max_bytes=0)
    off.add([1, 2, 3], entry(3))
    assert len(off) == 0
    # asked before a finished reply's keys/values are copied: only what `add` would keep
    assert cache.wants([7, 7, 7, 7, 7, 7, 7, 7, 3], 96 * 9, "a")  # a reply continuing a held prompt
    assert not cache.wants([7, 7, 7, 7], 96 * 4, "a")  # already held
    assert cache.wants([7, 7, 7, 7], 96 * 4, "b")  # not for this scope
    assert not cache.wants(list(range(30)), 96 * 30, "a")  # larger than the whole cache
    assert not off.wants([1, 2], 96 * 2)
