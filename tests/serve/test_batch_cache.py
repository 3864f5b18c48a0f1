"""The slot batch cache holds exactly the left-padded stack of its rows, whatever happened.

Reference: a naive model of the batch. Each row is a list of per-layer key/value tensors
that steps append to; the batch is those rows, left-padded with zeros to the longest, in
order, and a mask of ones on real positions. Random sequences of joins (short and long
prompts, so the used columns must move left, and more rows than slots), leaves (any subset,
so rows move down) and steps (more than the spare columns, so the buffers grow) must leave
the cache's keys/values and mask equal to the reference, bit for bit.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from moa.serve.batch_cache import BatchCache, layer_tensors

LAYERS, HEADS, DIM = 2, 3, 4


def random_row(rng: random.Random, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(1, HEADS, length, DIM), torch.randn(1, HEADS, length, DIM)) for _ in range(LAYERS)]


def reference(rows: list[list[tuple[torch.Tensor, torch.Tensor]]]):
    width = max(row[0][0].shape[-2] for row in rows)
    layers = []
    for layer in range(LAYERS):
        keys = torch.cat([F.pad(row[layer][0], (0, 0, width - row[layer][0].shape[-2], 0)) for row in rows])
        values = torch.cat([F.pad(row[layer][1], (0, 0, width - row[layer][1].shape[-2], 0)) for row in rows])
        layers.append((keys, values))
    mask = torch.stack([F.pad(torch.ones(row[0][0].shape[-2], dtype=torch.long), (width - row[0][0].shape[-2], 0))
                        for row in rows])
    return layers, mask


def step(batch: BatchCache, rows, rng_seed: int) -> None:
    """One decode step: every row gets one new key/value per layer, as the attention writes them."""
    torch.manual_seed(rng_seed)
    for layer in range(LAYERS):
        keys, values = torch.randn(batch.size, HEADS, 1, DIM), torch.randn(batch.size, HEADS, 1, DIM)
        got_keys, got_values = batch.cache.update(keys, values, layer)
        for i, row in enumerate(rows):
            row[layer] = (torch.cat([row[layer][0], keys[i: i + 1]], dim=-2),
                          torch.cat([row[layer][1], values[i: i + 1]], dim=-2))
        assert got_keys.shape[-2] == batch.mask.shape[1] + 1  # what the attention sees
    batch.advance()


def check(batch: BatchCache, rows) -> None:
    layers, mask = reference(rows)
    assert torch.equal(batch.mask, mask)
    for (k, v), (rk, rv) in zip(layer_tensors(batch.cache), layers, strict=True):
        assert torch.equal(k, rk) and torch.equal(v, rv)


@pytest.mark.parametrize("seed", range(6))
def test_random_joins_leaves_and_steps_keep_the_left_padded_stack(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    rows = [random_row(rng, rng.randint(1, 12)) for _ in range(3)]
    batch = BatchCache.from_rows(rows)
    check(batch, rows)
    for operation in range(150):
        choice = rng.random()
        if choice < 0.25:
            new = [random_row(rng, rng.choice([1, 5, rng.randint(20, 120)])) for _ in range(rng.randint(1, 4))]
            batch.join_rows(new)
            rows.extend(new)
        elif choice < 0.45 and len(rows) > 1:
            kept = sorted(rng.sample(range(len(rows)), rng.randint(1, len(rows) - 1)))
            batch.keep(kept)
            rows = [rows[i] for i in kept]
        else:
            for _ in range(rng.randint(1, 8)):
                step(batch, rows, rng.randint(0, 10**6))
        check(batch, rows)


@pytest.mark.parametrize("full", [False, True])
def test_a_restored_snapshot_forgets_a_failed_step(full):
    """Also when the failed step's write had to grow and move layer 0's buffers."""
    rng = random.Random(0)
    rows = [random_row(rng, n) for n in (4, 9)]
    batch = BatchCache.from_rows(rows)
    while full and batch.layers[0].end < batch.layers[0].key_buffer.shape[2]:
        step(batch, rows, rng.randint(0, 10**6))
    capacity, start = batch.layers[0].key_buffer.shape[2], batch.layers[0].start
    before = batch.snapshot()
    batch.cache.update(torch.randn(2, HEADS, 1, DIM), torch.randn(2, HEADS, 1, DIM), 0)  # layer 0 only, then a failure
    assert (batch.layers[0].key_buffer.shape[2], batch.layers[0].start) != (capacity, start) or not full
    batch.restore(before)
    check(batch, rows)
    step(batch, rows, 1)
    check(batch, rows)


def test_a_batch_that_never_empties_does_not_grow_without_bound():
    """Rows come and go for many steps; the buffers stay near the live rows' width."""
    rng = random.Random(1)
    rows = [random_row(rng, 8) for _ in range(4)]
    batch = BatchCache.from_rows(rows)
    for index in range(400):
        step(batch, rows, index)
        if index % 10 == 9:  # the oldest row leaves, a new one joins
            batch.keep(range(1, len(rows)))
            rows = rows[1:] + [random_row(rng, 8)]
            batch.join_rows(rows[-1:])
    check(batch, rows)
    assert batch.layers[0].key_buffer.shape[2] < 400


def test_a_step_for_the_wrong_number_of_rows_is_refused():
    rng = random.Random(0)
    batch = BatchCache.from_rows([random_row(rng, 3), random_row(rng, 5)])
    with pytest.raises(Exception, match="holds 2 rows"):
        batch.cache.update(torch.randn(3, HEADS, 1, DIM), torch.randn(3, HEADS, 1, DIM), 0)


def test_a_long_row_widens_the_buffers_without_adding_slots_and_they_shrink_back():
    """A long prompt joining a batch needs columns, not slots; once it and a burst of rows have
    left, the buffers come back to what the remaining rows need (a server keeps no peak)."""
    rng = random.Random(3)
    rows = [random_row(rng, 6) for _ in range(20)]
    batch = BatchCache.from_rows(rows)
    batch.keep(list(range(16)))  # 16 rows in 20 slots
    rows = rows[:16]
    slots = batch.layers[0].key_buffer.shape[0]
    long = random_row(rng, 500)
    batch.join_rows([long])
    rows.append(long)
    assert batch.layers[0].key_buffer.shape[0] == slots == 20  # wider, not more slots
    check(batch, rows)
    keep = [0, 3]
    batch.keep(keep)
    rows = [rows[i] for i in keep]
    check(batch, rows)
    layer = batch.layers[0]
    assert layer.key_buffer.shape[0] <= 8 and layer.key_buffer.shape[2] <= 4 * (layer.end - layer.start) + 256
    step(batch, rows, 1)
    check(batch, rows)
