"""The explicit backward of the weighted mixture: gradcheck on the reference, Triton against it."""

from __future__ import annotations

import pytest
import torch

from moa.kernels import build_metadata
from moa.kernels import reference as ref
from moa.kernels.autograd import lora_mixture
from moa.kernels.metadata import LoraStack
from tests.kernels.test_reference_kernels import random_routing

RANKS = [3, 0, 5, 2]  # slot 1 absent from the layer
H_IN, H_OUT = 6, 7


def leaves(ranks, dtype, device, seed=0, T=5):
    """Fresh leaf tensors: x, out, then A of each present slot, then B of each present slot."""
    gen = torch.Generator().manual_seed(seed)
    present = [r for r in ranks if r]
    tensors = [torch.randn(T, H_IN, generator=gen), torch.randn(T, H_OUT, generator=gen)]
    tensors += [torch.randn(r, H_IN, generator=gen) for r in present]
    tensors += [torch.randn(H_OUT, r, generator=gen) for r in present]
    return [t.to(dtype=dtype, device=device).requires_grad_(True) for t in tensors]


def stack_of(ranks, weights) -> LoraStack:
    present = [s for s, r in enumerate(ranks) if r]
    lora_a, lora_b = [None] * len(ranks), [None] * len(ranks)
    for i, slot in enumerate(present):
        lora_a[slot], lora_b[slot] = weights[i], weights[len(present) + i]
    scales = [0.0 if r == 0 else 0.5 + s for s, r in enumerate(ranks)]
    return LoraStack(lora_a, lora_b, scales, H_IN, H_OUT)


def mixture(x, pair_weight, out, *weights, ids, ranks=RANKS):
    meta = build_metadata(ids, torch.ones(ids.shape, device=ids.device), len(ranks))
    meta.pair_weight = pair_weight  # a differentiable input of its own
    return lora_mixture(x, stack_of(ranks, weights), meta, out)


def num_pairs(ids) -> int:
    return int((ids >= 0).sum())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradcheck_reference_float64(k, monkeypatch):
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "torch")
    ids, _ = random_routing(5, k, len(RANKS), seed=k, none_fraction=0.2)
    x, out, *weights = leaves(RANKS, torch.float64, "cpu", seed=k)
    pair_weight = torch.rand(num_pairs(ids), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: mixture(*t, ids=ids), (x, pair_weight, out, *weights))


def test_identity_routing_gradcheck(monkeypatch):
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "torch")
    ids = torch.full((5, 1), 2, dtype=torch.int32)  # set_adapter case: the gather-free path
    x, out, *weights = leaves(RANKS, torch.float64, "cpu", seed=9)
    pair_weight = torch.ones(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: mixture(*t, ids=ids), (x, pair_weight, out, *weights))


def test_gradients_reach_the_router_weights(monkeypatch):
    """Through build_metadata's pair_weight, as a trained gate would; equal to plain autograd."""
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "torch")
    ids, _ = random_routing(6, 2, len(RANKS), seed=4, none_fraction=0.0)
    x, out, *weights = leaves(RANKS, torch.float32, "cpu", T=6)
    gate = torch.rand(6, 2, requires_grad=True)
    stack = stack_of(RANKS, weights)

    def loss(use_function):
        meta = build_metadata(ids, gate.softmax(-1), len(RANKS))
        if use_function:
            y = lora_mixture(x, stack, meta, out)
        else:  # the reference ops are differentiable by autograd as they are
            y = ref.lora_expand(ref.lora_shrink(x, stack, meta), stack, meta, out.clone())
        return (y * torch.linspace(-1, 1, H_OUT)).square().sum()

    expected = torch.autograd.grad(loss(False), [gate, x, *weights])
    got = torch.autograd.grad(loss(True), [gate, x, *weights])
    assert expected[0].abs().sum() > 0
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_no_grad_updates_in_place(monkeypatch):
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "torch")
    ids, _ = random_routing(5, 2, len(RANKS), seed=1)
    x, out, *weights = (t.detach() for t in leaves(RANKS, torch.float32, "cpu"))
    pair_weight = torch.rand(num_pairs(ids))
    before = out.clone()
    with torch.no_grad():
        result = mixture(x, pair_weight, out, *weights, ids=ids)
    assert result is out and not torch.equal(out, before)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_triton_backward_matches_reference(k, monkeypatch, device):
    pytest.importorskip("triton")
    ranks = [4, 0, 8, 16, 64]
    ids, _ = random_routing(7, k, len(ranks), seed=20 + k)
    ids = ids.to(device)
    pair_weight = torch.rand(num_pairs(ids), device=device)
    grad_y = torch.randn(7, H_OUT, device=device)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOA_KERNEL_BACKEND", backend)
        x, out, *weights = leaves(ranks, torch.float32, device, seed=k, T=7)
        w = pair_weight.clone().requires_grad_(True)
        y = mixture(x, w, out, *weights, ids=ids, ranks=ranks)
        inputs = [x, w, out, *weights]
        results[backend] = (y.detach(), *torch.autograd.grad(y, inputs, grad_y))
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
