"""The torch reference kernels against a naive per-token float64 loop."""

from __future__ import annotations

import pytest
import torch

from moa.kernels import build_metadata
from moa.kernels.metadata import LoraStack
from moa.kernels.reference import lora_expand, lora_shrink


def make_stack(ranks, h_in, h_out, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lora_a = [None if r == 0 else torch.randn(r, h_in, generator=gen, dtype=dtype) for r in ranks]
    lora_b = [None if r == 0 else torch.randn(h_out, r, generator=gen, dtype=dtype) for r in ranks]
    scales = [0.0 if r == 0 else 0.5 + i for i, r in enumerate(ranks)]
    return LoraStack(lora_a, lora_b, scales, h_in, h_out)


def naive(x, stack, ids, weights):
    """out[t] = sum_j w[t, j] * scale[a] * B[a] @ A[a] @ x[t], in float64."""
    out = torch.zeros(x.shape[0], stack.out_features, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            a = int(ids[t, j])
            if a < 0 or stack.lora_a[a] is None:
                continue
            A, B = stack.lora_a[a].double(), stack.lora_b[a].double()
            out[t] += float(weights[t, j]) * stack.scales[a] * (B @ (A @ x[t].double()))
    return out


def random_routing(T, k, N, seed, none_fraction=0.3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N, (T, k), generator=gen, dtype=torch.int32)
    ids[torch.rand(T, k, generator=gen) < none_fraction] = -1
    weights = torch.rand(T, k, generator=gen)
    return ids, weights


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_shrink_expand_match_naive_loop(T, k):
    ranks = [4, 0, 8, 16, 64]  # slot 1 absent from this layer; mixed ranks, no padding
    stack = make_stack(ranks, h_in=24, h_out=40)
    ids, weights = random_routing(T, k, len(ranks), seed=T * 10 + k)
    x = torch.randn(T, 24)
    meta = build_metadata(ids, weights, len(ranks))
    base = torch.randn(T, 40)
    out = lora_expand(lora_shrink(x, stack, meta), stack, meta, base.clone())
    torch.testing.assert_close(out.double() - base.double(), naive(x, stack, ids, weights), rtol=1e-5, atol=1e-4)


def test_all_ids_none_leaves_output_unchanged():
    stack = make_stack([4, 8], 16, 16)
    ids = torch.full((6, 2), -1, dtype=torch.int32)
    meta = build_metadata(ids, torch.ones(6, 2), 2)
    assert meta.num_pairs == 0 and meta.active_adapters == ()
    base = torch.randn(6, 16)
    out = lora_expand(lora_shrink(torch.randn(6, 16), stack, meta), stack, meta, base.clone())
    assert torch.equal(out, base)


def test_metadata_groups_pairs_by_adapter_stably():
    ids = torch.tensor([[2, 0], [0, -1], [2, 1], [1, 0]], dtype=torch.int32)
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.2, 0.0], [1.0, 0.3]])
    meta = build_metadata(ids, weights, 3)
    # zero weights are dropped like -1; within a group, tokens keep their order
    assert meta.pair_adapter.tolist() == [0, 0, 0, 1, 2, 2]
    assert meta.token_index.tolist() == [0, 1, 3, 3, 0, 2]
    assert meta.offsets == (0, 3, 4, 6)
    assert meta.active_adapters == (0, 1, 2)
    assert meta.pair_weight.tolist() == pytest.approx([0.5, 1.0, 0.3, 1.0, 0.5, 0.2])
    assert meta.identity_adapter is None


def test_identity_fast_path_equals_general_path():
    stack = make_stack([8, 4], 12, 20)
    x = torch.randn(9, 12)
    ids = torch.zeros(9, 1, dtype=torch.int32)
    meta = build_metadata(ids, torch.ones(9, 1), 2)
    assert meta.identity_adapter == 0
    got = lora_expand(lora_shrink(x, stack, meta), stack, meta, torch.zeros(9, 20))
    torch.testing.assert_close(got.double(), naive(x, stack, ids, torch.ones(9, 1)), rtol=1e-5, atol=1e-5)


def test_reference_is_differentiable_for_x_a_b_and_weights():
    stack = make_stack([3, 5], 6, 7, dtype=torch.float64)
    for t in (*stack.lora_a, *stack.lora_b):
        t.requires_grad_(True)
    ids, _ = random_routing(5, 2, 2, seed=3, none_fraction=0.2)
    ids[0, 0] = 0  # at least one pair
    weights = torch.rand(5, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    def run(x, w, a0, a1, b0, b1):
        s = LoraStack([a0, a1], [b0, b1], stack.scales, 6, 7)
        meta = build_metadata(ids, w, 2)
        meta.pair_weight = meta.pair_weight.to(torch.float64)
        return lora_expand(lora_shrink(x, s, meta), s, meta, torch.zeros(5, 7, dtype=torch.float64))

    inputs = (x, *stack.lora_a, *stack.lora_b)
    assert torch.autograd.gradcheck(lambda *t: run(t[0], weights.detach(), *t[1:]), inputs)


@pytest.mark.parametrize("k", [1, 2])
def test_row_runs_path_matches_naive_loop(k):
    from moa.kernels.runs import token_runs

    ranks = [4, 0, 8, 16]
    rows, seq = 6, 20  # row-level routing: every adapter gets whole rows (long runs)
    gen = torch.Generator().manual_seed(k)
    row_ids = torch.randint(0, len(ranks), (rows, k), generator=gen, dtype=torch.int32)
    if k == 2:
        row_ids[:, 1] = (row_ids[:, 0] + 1) % len(ranks)
    ids = row_ids.repeat_interleave(seq, 0)
    weights = torch.rand(rows, k, generator=gen).repeat_interleave(seq, 0)
    stack = make_stack(ranks, 24, 40)
    meta = build_metadata(ids, weights, len(ranks))
    assert token_runs(meta) is not None  # the in-place run path is the one under test
    x = torch.randn(rows * seq, 24, generator=gen)
    base = torch.randn(rows * seq, 40, generator=gen)
    out = lora_expand(lora_shrink(x, stack, meta), stack, meta, base.clone())
    torch.testing.assert_close(out.double() - base.double(), naive(x, stack, ids, weights), rtol=1e-5, atol=1e-4)


def test_a_stack_of_factors_made_under_inference_mode_packs_and_caches():
    """Adapter types whose factors are products (AdaLoRA's E*A) make inference tensors under ``moa serve``."""
    with torch.inference_mode():
        a, b = torch.randn(3, 6) * 2.0, torch.randn(7, 3)  # products: inference tensors, no version counter
        stack = LoraStack([a, None], [b, None], [0.5, 0.0], 6, 7)
        first = stack.packed()
        assert stack.packed() is first  # the same storage: the cached buffers are reused
        torch.testing.assert_close(first.lora_a[:3], a)
