"""The dense few-token strategy computes exactly what the grouped reference computes."""

from __future__ import annotations

import pytest
import torch

from moa.kernels import build_metadata
from moa.kernels.autograd import lora_mixture
from moa.kernels.dense import lora_dense, prefer_dense
from moa.kernels.reference import lora_expand, lora_shrink
from tests.kernels.test_reference_kernels import make_stack, naive, random_routing


@pytest.mark.parametrize("T", [1, 7, 16])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dense_equals_grouped_and_the_naive_loop(T, k):
    ranks = [4, 0, 8, 16, 64]  # an absent slot, mixed ranks
    stack = make_stack(ranks, h_in=24, h_out=40)
    ids, weights = random_routing(T, k, len(ranks), seed=100 + T * 10 + k)
    ids[0, 0], weights[0, 0] = 2, 0.5  # at least one pair
    if k > 1:
        ids[0, 1], weights[0, 1] = 2, 0.25  # the same adapter twice for one token: weights add
    gen = torch.Generator().manual_seed(T * 10 + k)
    x = torch.randn(T, 24, generator=gen)
    meta = build_metadata(ids, weights, len(ranks))
    base = torch.randn(T, 40, generator=gen)
    dense = lora_dense(x, stack, meta, base.clone())
    grouped = lora_expand(lora_shrink(x, stack, meta), stack, meta, base.clone())
    torch.testing.assert_close(dense, grouped, rtol=1e-5, atol=1e-4)  # float32 sums of ~100s
    torch.testing.assert_close(dense.double() - base.double(), naive(x, stack, ids, weights), rtol=1e-5, atol=1e-4)


def test_the_choice_follows_the_work():
    stack = make_stack([16] * 8, h_in=24, h_out=40)
    decode = build_metadata(torch.arange(16, dtype=torch.int32)[:, None] % 8, torch.ones(16, 1), 8)
    assert prefer_dense(stack, decode)  # 16 rows over 8 adapters: two GEMMs beat 8 groups
    long_mixed = build_metadata(torch.arange(4096, dtype=torch.int32)[:, None] % 8, torch.ones(4096, 1), 8)
    assert not prefer_dense(stack, long_mixed)  # 8x the routed work: group instead
    one = make_stack([16], h_in=24, h_out=40)
    assert prefer_dense(one, build_metadata(torch.zeros(4096, 1, dtype=torch.int32), torch.ones(4096, 1), 1))


def test_training_keeps_the_differentiable_path():
    stack = make_stack([4, 8], h_in=12, h_out=10)
    for tensor in (*stack.lora_a, *stack.lora_b):
        tensor.requires_grad_(True)
    ids, weights = random_routing(5, 2, 2, seed=3, none_fraction=0.0)
    meta = build_metadata(ids, weights, 2)
    out = lora_mixture(torch.randn(5, 12), stack, meta, torch.zeros(5, 10))
    out.sum().backward()
    assert all(t.grad is not None for t in stack.lora_a)


def test_packed_buffers_follow_weights_replaced_through_data():
    """``module.to(dtype)`` and back swaps ``param.data`` without bumping its version."""
    stack = make_stack([4, 8], h_in=12, h_out=10)
    ids = torch.tensor([[0], [1], [0]], dtype=torch.int32)
    meta = build_metadata(ids, torch.ones(3, 1), 2)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(0))
    first = lora_dense(x, stack, meta, torch.zeros(3, 10))
    stack.lora_a[0].data = stack.lora_a[0].data * 2  # a new storage, same tensor object, same version
    second = lora_dense(x, stack, build_metadata(ids, torch.ones(3, 1), 2), torch.zeros(3, 10))
    grouped = lora_expand(lora_shrink(x, stack, meta), stack, meta, torch.zeros(3, 10))
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, grouped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 16])
def test_the_batched_expand_has_the_bits_of_one_expand_per_adapter(T):
    """Every adapter routed, equal ranks: one batched GEMM, bit for bit the per-adapter loop
    (each product summed in slot order, then added), for single adapters and mixtures."""
    stack = make_stack([16] * 8, h_in=64, h_out=96)
    gen = torch.Generator().manual_seed(T)
    x, base = torch.randn(T, 64, generator=gen), torch.randn(T, 96, generator=gen)
    ids = torch.full((T, 3), -1, dtype=torch.int32)
    ids[:, 0] = torch.arange(T, dtype=torch.int32) % 8
    if T > 1:
        ids[-1] = torch.tensor([0, 2, 6], dtype=torch.int32)  # a three-adapter mixture
        ids[-2, :2] = torch.tensor([1, 5], dtype=torch.int32)
    else:  # one row: all 8 adapters must be routed for the batched expand
        ids = torch.arange(8, dtype=torch.int32)[None]
    weights = torch.rand(*ids.shape, generator=gen)
    out = lora_dense(x, stack, build_metadata(ids, weights, 8), base.clone())
    packed = stack.packed()
    coefficients = torch.zeros(T, 8 * 16)
    for t in range(T):
        for a, w in zip(ids[t].tolist(), weights[t].tolist(), strict=True):
            if a >= 0:
                coefficients[t, a * 16:(a + 1) * 16] = torch.tensor(w) * packed.scales[a]
    scaled = x @ packed.lora_a.t() * coefficients
    delta = scaled[:, :16] @ packed.lora_b[:16]
    for a in range(1, 8):
        delta = delta + scaled[:, a * 16:(a + 1) * 16] @ packed.lora_b[a * 16:(a + 1) * 16]
    assert torch.equal(out, base + delta)
    torch.testing.assert_close(out.double() - base.double(), naive(x, stack, ids, weights), rtol=1e-5, atol=1e-4)


def test_torch_sums_fewer_than_16_rows_in_order():
    """The batched expand relies on ``sum(0)`` over < 16 adapters being a running sum."""
    gen = torch.Generator().manual_seed(0)
    for n in (2, 3, 8, 15):
        parts = torch.randn(n, 16, 300, generator=gen) * torch.logspace(-6, 6, n)[:, None, None]
        running = parts[0].clone()
        for part in parts[1:]:
            running += part
        assert torch.equal(parts.sum(0), running)
