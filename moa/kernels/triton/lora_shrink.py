"""Weighted multi-adapter LoRA shrink (Triton).

Algorithm: the "shrink" half of Punica's SGMV (Chen et al., 2023, "Punica: Multi-Tenant
LoRA Serving") as also used by S-LoRA (Sheng et al., 2023, "S-LoRA: Serving Thousands of
Concurrent LoRA Adapters"): (token, adapter) pairs are grouped by adapter (the shared
:class:`~moa.kernels.metadata.RoutingMetadata`), every program takes a tile of up to
``BLOCK_M`` pairs of ONE adapter, gathers their activation rows through ``token_index``
(no reordering copy of ``x``) and multiplies them by that adapter's ``A`` tile, so each
``A`` is read once per tile, not once per token. Ranks differ between adapters: the
adapters' ``A`` rows are packed back to back (:meth:`LoraStack.packed`, ``rank_offsets``)
and a program only computes the rank columns its adapter has; nothing is padded to the
largest rank except the width of the output buffer ``h`` (``[P, R_max]``, zero filled).

moa's addition, which no public kernel has: each pair carries a routing weight, so a
token may mix its top-k adapters. The weight times the adapter's scale is folded into the
rank-r intermediate here (``r`` multiplies per pair instead of ``H_out``).

Precision: loads in the input dtype (fp32 / fp16 / bf16), products accumulated in fp32
(``tl.dot``; fp32 inputs use IEEE fp32, not TF32, to match the torch reference), one
rounding to ``x.dtype`` on store.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moa.kernels.metadata import LoraStack, RoutingMetadata

__all__ = ["lora_shrink"]


def _pick_block_m(meta: RoutingMetadata) -> int:
    """Rows (pairs) per tile: 16 for small groups (decode), 64 for large ones (prefill)."""
    groups = max(len(meta.active_adapters), 1)
    return 64 if meta.num_pairs // groups >= 64 else 16


def _rank_block(max_rank: int) -> int:
    """Rank columns per program: the next power of two of ``R_max``, within [16, 64]."""
    return min(max(16, triton.next_power_of_2(max(max_rank, 1))), 64)


def _adapter_tiles(meta: RoutingMetadata, block_m: int) -> torch.Tensor:
    """Tiles of pairs, each inside one adapter's group; built once per forward.

    Args:
        meta: the forward's pairs grouped by adapter.
        block_m: pairs per tile.

    Returns:
        ``[3, n_tiles]`` int32 on the metadata's device: adapter slot, first pair and
        end pair (exclusive, the end of that adapter's group) of each tile.
    """

    def build() -> torch.Tensor:
        adapters: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        for slot in meta.active_adapters:
            start, end = meta.pairs_of(slot)
            for tile_start in range(start, end, block_m):
                adapters.append(slot)
                starts.append(tile_start)
                ends.append(end)
        return torch.tensor([adapters, starts, ends], dtype=torch.int32).to(meta.token_index.device)

    return meta.extra(f"triton_adapter_tiles_{block_m}", build)


def _dot_options(dtype: torch.dtype) -> tuple[str, bool]:
    """``(input_precision, upcast)`` for ``tl.dot`` on operands of ``dtype``.

    fp32 uses IEEE fp32 (not TF32) to match the torch reference. The Triton interpreter
    (``TRITON_INTERPRET=1``) stores bf16 as raw uint16 and its ``tl.dot`` on them is
    wrong, so interpreted runs upcast 16-bit operands to fp32 first: the products of
    16-bit values are exact in fp32, so this equals a 16-bit dot with fp32 accumulation.
    """
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if dtype == torch.float32 or interpreted:
        return "ieee", interpreted and dtype != torch.float32
    return "tf32", False  # ignored for 16-bit operands


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` in fp32 (see :func:`_dot_options`)."""
    if UPCAST:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
    else:
        result = tl.dot(a, b, input_precision=DOT_PRECISION)
    return result


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    tiles_ptr,
    token_index_ptr,
    pair_weight_ptr,
    rank_offsets_ptr,
    scales_ptr,
    n_tiles,
    h_in,
    max_rank,
    stride_xt,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_hp,
    stride_hr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program: ``BLOCK_M`` pairs of one adapter x ``BLOCK_R`` rank columns."""
    tile = tl.program_id(0)
    pid_r = tl.program_id(1)
    slot = tl.load(tiles_ptr + tile)
    start = tl.load(tiles_ptr + n_tiles + tile)
    end = tl.load(tiles_ptr + 2 * n_tiles + tile)
    rank_start = tl.load(rank_offsets_ptr + slot)
    rank = tl.load(rank_offsets_ptr + slot + 1) - rank_start

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    tokens = tl.load(token_index_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    rows_a = (rank_start + offs_r).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # Rank tiles past this adapter's rank (absent adapter: rank 0) skip the K loop and
    # only write their zeros.
    k_end = tl.where(pid_r * BLOCK_R < rank, h_in, 0)
    for k in range(0, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < h_in
        x_tile = tl.load(
            x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        a_tile = tl.load(
            a_ptr + rows_a[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=mask_r[None, :] & mask_k[:, None],
            other=0.0,
        )
        acc += _dot(x_tile.to(a_tile.dtype), a_tile, DOT_PRECISION, UPCAST)

    weight = tl.load(pair_weight_ptr + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + slot)
    acc = acc * (weight * scale)[:, None]
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hp + offs_r[None, :] * stride_hr
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_r < max_rank)[None, :])


def lora_shrink(x: torch.Tensor, stack: LoraStack, meta: RoutingMetadata) -> torch.Tensor:
    """Project every (token, adapter) pair down to its adapter's rank.

    Args:
        x: ``[T, H_in]`` activations, in the adapters' dtype.
        stack: this layer's adapters by slot (``A`` is ``[r_a, H_in]``).
        meta: the forward's pairs grouped by adapter (``P`` pairs).

    Returns:
        ``h``: ``[P, R_max]`` in ``x.dtype``, where ``R_max = stack.max_rank``; row ``p``
        belongs to pair ``p`` of ``meta`` (grouped by adapter).

    Semantics::

        for p in range(P):
            t, a, w = meta.token_index[p], meta.pair_adapter[p], meta.pair_weight[p]
            r = rank of adapter a in this layer (0 if absent)
            h[p, :r] = w * stack.scales[a] * (stack.lora_a[a] @ x[t])
            h[p, r:] = 0
    """
    max_rank = stack.max_rank
    num_pairs = meta.num_pairs
    if num_pairs == 0 or max_rank == 0:
        return torch.zeros(num_pairs, max_rank, dtype=x.dtype, device=x.device)
    packed = stack.packed()
    h = torch.empty(num_pairs, max_rank, dtype=x.dtype, device=x.device)  # every element is written
    block_m = _pick_block_m(meta)
    block_r = _rank_block(max_rank)
    tiles = _adapter_tiles(meta, block_m)
    n_tiles = tiles.shape[1]
    h_in = x.shape[1]
    # fp32 tiles are twice the bytes: 64 keeps the pipelined shared memory near 64 KiB.
    block_k = min(64 if x.dtype == torch.float32 else 128, max(16, triton.next_power_of_2(h_in)))
    grid = (n_tiles, triton.cdiv(max_rank, block_r))
    precision, upcast = _dot_options(x.dtype)
    _shrink_kernel[grid](
        x,
        packed.lora_a,
        h,
        tiles,
        meta.token_index,
        meta.pair_weight,
        packed.rank_offsets,
        packed.scales,
        n_tiles,
        h_in,
        max_rank,
        x.stride(0),
        x.stride(1),
        packed.lora_a.stride(0),
        packed.lora_a.stride(1),
        h.stride(0),
        h.stride(1),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        DOT_PRECISION=precision,
        UPCAST=upcast,
    )
    return h
