"""Triton shrink/expand against the torch reference (interpreted on CPU, real on CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import moa  # noqa: E402
from moa.kernels import build_metadata  # noqa: E402
from moa.kernels import reference as ref  # noqa: E402
from moa.kernels import triton as tri  # noqa: E402
from moa.kernels.metadata import LoraStack  # noqa: E402
from moa.kernels.triton.lora_expand import _combination_tiles  # noqa: E402
from moa.kernels.triton.lora_shrink import _pick_block_m  # noqa: E402
from tests.kernels.test_reference_kernels import naive, random_routing  # noqa: E402

MIXED_RANKS = [4, 0, 8, 16, 64]  # slot 1 is absent from the layer


def make_stack(ranks, h_in, h_out, dtype=torch.float32, device="cpu", seed=0) -> LoraStack:
    """Random adapters with unit-size outputs (so fp32 tolerances of 1e-5 are meaningful)."""
    gen = torch.Generator().manual_seed(seed)
    lora_a = [None if r == 0 else torch.randn(r, h_in, generator=gen) / h_in**0.5 for r in ranks]
    lora_b = [None if r == 0 else torch.randn(h_out, r, generator=gen) / max(r, 1) ** 0.5 for r in ranks]
    scales = [0.0 if r == 0 else 0.5 + 0.25 * i for i, r in enumerate(ranks)]
    to = dict(dtype=dtype, device=device)
    return LoraStack(
        [None if a is None else a.to(**to) for a in lora_a],
        [None if b is None else b.to(**to) for b in lora_b],
        scales,
        h_in,
        h_out,
    )


def run_both(x, stack, meta, out):
    """``(reference, triton)`` results of shrink then expand into copies of ``out``."""
    h_ref = ref.lora_shrink(x, stack, meta)
    h_tri = tri.lora_shrink(x, stack, meta)
    out_ref = ref.lora_expand(h_ref, stack, meta, out.clone())
    out_tri = tri.lora_expand(h_tri, stack, meta, out.clone())
    return h_ref, h_tri, out_ref, out_tri


def routing(T, k, n, seed, device, none_fraction=0.3):
    ids, weights = random_routing(T, k, n, seed, none_fraction)
    return ids.to(device), weights.to(device)


@pytest.mark.parametrize("T", [1, 5, 33])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_fp32_matches_reference(T, k, device):
    stack = make_stack(MIXED_RANKS, h_in=24, h_out=40, device=device)
    ids, weights = routing(T, k, len(MIXED_RANKS), T * 10 + k, device)
    meta = build_metadata(ids, weights, len(MIXED_RANKS))
    x = torch.randn(T, 24, device=device)
    out = torch.randn(T, 40, device=device)
    h_ref, h_tri, out_ref, out_tri = run_both(x, stack, meta, out)
    assert h_tri.shape == h_ref.shape == (meta.num_pairs, 64) and h_tri.dtype == x.dtype
    torch.testing.assert_close(h_tri, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_half_precision_relative_norm(dtype, out_dtype, device):
    out_dtype = out_dtype or dtype
    stack = make_stack(MIXED_RANKS, h_in=40, h_out=24, dtype=dtype, device=device, seed=1)
    ids, weights = routing(33, 2, len(MIXED_RANKS), 7, device)
    meta = build_metadata(ids, weights, len(MIXED_RANKS))
    x = torch.randn(33, 40, device=device).to(dtype)
    out = torch.zeros(33, 24, device=device, dtype=out_dtype)
    _, h_tri, out_ref, out_tri = run_both(x, stack, meta, out)
    assert h_tri.dtype == dtype and out_tri.dtype == out_dtype
    exact = naive(x.float().cpu(), _to_cpu64(stack), ids.cpu(), weights.cpu())

    def rel(got):
        return float((got.double().cpu() - exact).norm() / exact.norm())

    assert rel(out_tri) <= 1e-2
    assert float((out_tri.double() - out_ref.double()).norm() / out_ref.double().norm()) <= 1e-2


def _to_cpu64(stack: LoraStack) -> LoraStack:
    conv = [None if t is None else t.detach().double().cpu() for t in (*stack.lora_a, *stack.lora_b)]
    n = len(stack.lora_a)
    return LoraStack(conv[:n], conv[n:], stack.scales, stack.in_features, stack.out_features)


def test_all_ids_none_leaves_output_unchanged(device):
    stack = make_stack([4, 8], 16, 16, device=device)
    ids = torch.full((6, 2), -1, dtype=torch.int32, device=device)
    meta = build_metadata(ids, torch.ones(6, 2, device=device), 2)
    out = torch.randn(6, 16, device=device)
    h = tri.lora_shrink(torch.randn(6, 16, device=device), stack, meta)
    assert h.shape == (0, 8)
    assert torch.equal(tri.lora_expand(h, stack, meta, out.clone()), out)


def test_one_adapter_for_every_token_and_large_group(device):
    # 70 pairs of one adapter: the 64-row tile path, a partial last tile, identity routing.
    stack = make_stack([16, 8], 24, 40, device=device)
    ids = torch.ones(70, 1, dtype=torch.int32, device=device)
    meta = build_metadata(ids, torch.ones(70, 1, device=device), 2)
    assert meta.identity_adapter == 1 and _pick_block_m(meta) == 64
    x, out = torch.randn(70, 24, device=device), torch.randn(70, 40, device=device)
    h_ref, h_tri, out_ref, out_tri = run_both(x, stack, meta, out)
    torch.testing.assert_close(h_tri, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-5)


def test_wide_layers_rank_above_block_and_strided_views(device):
    # H_in / H_out above one block (several K and N tiles), rank 80 > the 64-column rank
    # block (two rank tiles in shrink, two rank steps in expand), non-contiguous x and out.
    stack = make_stack([80, 4, 0], 200, 150, device=device, seed=2)
    ids, weights = routing(9, 2, 3, 11, device, none_fraction=0.1)
    meta = build_metadata(ids, weights, 3)
    x = torch.randn(200, 9, device=device).t()
    out = torch.randn(150, 9, device=device).t()
    assert not x.is_contiguous() and not out.is_contiguous()
    h_ref, h_tri, out_ref, out_tri = run_both(x, stack, meta, out)
    torch.testing.assert_close(h_tri, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-5)


def test_same_adapter_twice_in_one_token_accumulates(device):
    stack = make_stack([8, 4], 16, 24, device=device)
    ids = torch.tensor([[0, 0], [1, 0], [1, -1]], dtype=torch.int32, device=device)
    weights = torch.tensor([[0.25, 0.5], [1.0, 2.0], [0.5, 0.0]], device=device)
    meta = build_metadata(ids, weights, 2)
    x, out = torch.randn(3, 16, device=device), torch.randn(3, 24, device=device)
    _, _, out_ref, out_tri = run_both(x, stack, meta, out)
    torch.testing.assert_close(out_tri, out_ref, rtol=1e-5, atol=1e-5)


def test_combination_tiles_own_every_token_once(device):
    ids, weights = routing(40, 3, 5, 5, device, none_fraction=0.4)
    meta = build_metadata(ids, weights, 5)
    tiles = _combination_tiles(meta, 16)
    assert _combination_tiles(meta, 16) is tiles  # cached once per forward, shared by layers
    order = tiles.token_order.cpu().tolist()
    has_pairs = sorted({int(t) for t in meta.token_index.cpu()})
    assert sorted(order) == has_pairs  # each routed token exactly once: no write races
    pairs = tiles.token_pairs.cpu()
    adapters = meta.pair_adapter.cpu()
    spans = tiles.tiles.cpu().t().tolist()
    for tile, (start, end) in enumerate(spans):
        assert 0 < end - start <= 16
        for row in range(start, end):
            for j, slot in enumerate(tiles.tile_adapters[tile].cpu().tolist()):
                p = int(pairs[row, j])
                assert (p < 0) == (slot < 0)
                if p >= 0:
                    assert int(adapters[p]) == slot and int(meta.token_index[p]) == order[row]


def test_model_logits_triton_equal_torch(tiny_model, input_ids, monkeypatch, device):
    tiny_model.to(device)
    input_ids = input_ids.to(device)
    for i, (name, r) in enumerate([("a", 4), ("b", 16), ("c", 8)]):
        torch.manual_seed(10 + i)
        targets = "all-linear" if name != "c" else ["q_proj", "down_proj"]
        config = moa.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
        tiny_model.add_adapter(name, config)

    calls = []
    shrink = tri.lora_shrink
    monkeypatch.setattr(tri, "lora_shrink", lambda *a: calls.append(1) or shrink(*a))

    def logits(backend, **kw):
        monkeypatch.setenv("MOA_KERNEL_BACKEND", backend)
        with torch.no_grad():
            return tiny_model(input_ids, **kw).logits

    rows = ["a", None, "c", "b"]
    per_row = logits("triton", adapter_names=rows)
    torch.testing.assert_close(per_row, logits("torch", adapter_names=rows), rtol=1e-5, atol=1e-5)
    mixtures = [{"a": 0.7, "b": 0.3}, {"c": 1.5}, {"a": 0.2, "b": 0.5, "c": 0.9}, None]
    mixed = logits("triton", adapter_weights=mixtures)
    torch.testing.assert_close(mixed, logits("torch", adapter_weights=mixtures), rtol=1e-5, atol=1e-5)
    assert (mixed[:3] - logits("torch", adapter_names=[None] * 4)[:3]).abs().max() > 1e-2
    assert len(calls) == 2 * 4 * 7  # two triton forwards x 28 adapted layers (4 x 7): the kernels really ran


_COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moa.kernels.triton.lora_expand import _expand_kernel
from moa.kernels.triton.lora_shrink import _shrink_kernel

POINTERS = {"x_ptr": "*bf16", "a_ptr": "*bf16", "h_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp32",
            "token_index_ptr": "*i64", "token_order_ptr": "*i64", "pair_weight_ptr": "*fp32", "scales_ptr": "*fp32"}
CONSTANTS = {"BLOCK_M": 64, "BLOCK_R": 16, "BLOCK_K": 128, "BLOCK_N": 128, "MAX_PAIRS": 2,
             "DOT_PRECISION": "tf32", "UPCAST": False}
for kernel in (_shrink_kernel, _expand_kernel):
    names = kernel.arg_names
    signature = {n: "constexpr" if n.isupper() else POINTERS.get(n, "*i32" if n.endswith("_ptr") else "i32")
                 for n in names}
    constexprs = {n: CONSTANTS[n] for n in names if n.isupper()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
print("compiled")
"""


def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter does not type-check like the compiler: build both kernels for sm_90 (bf16, k=2)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True, text=True)
    if "ImportError" in done.stderr and "ASTSource" in done.stderr:
        pytest.skip("this triton version has no ahead-of-time compile API")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
