"""Weighted multi-adapter LoRA expand (Triton).

Algorithm: the "expand" half of Punica's SGMV (Chen et al., 2023, "Punica: Multi-Tenant
LoRA Serving") and S-LoRA (Sheng et al., 2023): tokens grouped so that every program
reads one adapter's ``B`` tile once for up to ``BLOCK_M`` rows and multiplies it by their
rank-r intermediates on the tensor cores, then adds the result into the output rows
gathered through the token index (no reordering copy of the output). Ranks differ per
adapter: ``B`` is packed back to back (:meth:`LoraStack.packed`, ``rank_offsets``) and the
rank loop runs to each adapter's own rank only.

moa's addition, which no public kernel has: a token may mix its top-k adapters, so k pairs
add into the same output row. Those pairs live in different adapter groups, so a plain
SGMV grid would race on the row. Instead of atomics (non-deterministic, no bf16 atomics in
the Triton interpreter, k roundings of a bf16 output) or an fp32 staging buffer
(``[T, H_out]`` extra traffic), the tiles here are built over the *adapter combination*
of each token (its sorted tuple of adapters; ``meta.extra`` caches the map once per
forward, shared by every layer): all rows of a tile use the same k adapters, so the
program reads each of those k ``B`` tiles once, sums the k products in fp32 registers and
does ONE read-modify-write of each output row. Every row is owned by exactly one program:
no atomics, deterministic, a single rounding to the output dtype. With k = 1 the
combinations are the adapters and this is exactly SGMV. The cost: when tokens use many
distinct combinations (e.g. random top-2 of 64), tiles get small and the ``B`` tiles are
re-read per combination (from L2).

Sibling projections (q/k/v, gate/up) are not fused into one launch: the default base
(Llama: SmolLM2) keeps them as separate ``nn.Linear`` modules, so the base does not fuse
them either, and each MixtureLinear launches its own shrink and expand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moa.kernels.metadata import LoraStack, RoutingMetadata
from moa.kernels.triton.lora_shrink import _dot, _dot_options, _pick_block_m, _rank_block

__all__ = ["lora_expand"]


@dataclass(frozen=True)
class _CombinationTiles:
    """Token tiles grouped by adapter combination (built once per forward).

    Attributes:
        max_pairs: ``K``, the most pairs any token has (its mixture size).
        token_order: ``[T_act]`` int64, tokens with at least one pair, grouped by combination.
        token_pairs: ``[T_act, K]`` int32, pair index of each such token's j-th adapter
            (adapters in ascending slot order), -1 past its own count.
        tiles: ``[2, n_tiles]`` int32, first and end row (in ``token_order``) of each tile.
        tile_adapters: ``[n_tiles, K]`` int32, the shared adapters of the tile's rows
            (-1 past the combination's size).
    """

    max_pairs: int
    token_order: torch.Tensor
    token_pairs: torch.Tensor
    tiles: torch.Tensor
    tile_adapters: torch.Tensor

    @property
    def num_tiles(self) -> int:
        """Programs along the token axis."""
        return int(self.tiles.shape[1])


def _tiles_over_groups(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split consecutive groups of ``counts`` rows into tiles of at most ``block_m`` rows.

    Returns:
        ``(group, start, end)`` per tile: the group index, first row and the group's end row.
    """
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    per_group = (counts + block_m - 1) // block_m
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), per_group)
    first_tile = torch.cumsum(per_group, 0) - per_group
    within = torch.arange(group.numel(), device=counts.device) - first_tile[group]
    return group, starts[group] + within * block_m, ends[group]


def _combination_tiles(meta: RoutingMetadata, block_m: int) -> _CombinationTiles:
    """The token-major pair map and its tiles, cached in ``meta`` (one build per forward).

    Args:
        meta: the forward's pairs grouped by adapter.
        block_m: rows per tile.

    Returns:
        The :class:`_CombinationTiles` of this forward.
    """
    return meta.extra(f"triton_combination_tiles_{block_m}", lambda: _build_combination_tiles(meta, block_m))


def _build_combination_tiles(meta: RoutingMetadata, block_m: int) -> _CombinationTiles:
    device = meta.token_index.device
    token = meta.token_index.to(torch.int64)
    adapter = meta.pair_adapter.to(torch.int64)
    num_pairs = token.numel()
    counts = torch.bincount(token, minlength=meta.num_tokens)
    max_pairs = int(counts.max()) if num_pairs else 0
    if max_pairs <= 1:
        # One pair per token: the combinations are the adapters and the pair order of
        # the metadata is already grouped. This is plain SGMV.
        group_counts = meta.adapter_offsets[1:] - meta.adapter_offsets[:-1]
        group, starts, ends = _tiles_over_groups(group_counts, block_m)
        return _CombinationTiles(
            max_pairs=max_pairs,
            token_order=token,
            token_pairs=torch.arange(num_pairs, dtype=torch.int32, device=device)[:, None],
            tiles=torch.stack([starts, ends]).to(torch.int32),
            tile_adapters=group.to(torch.int32)[:, None],
        )
    # Pairs of each token, in ascending adapter order (the pair list is sorted by adapter
    # and this sort is stable), laid out as a [T, K] map.
    by_token = torch.argsort(token, stable=True)
    token_sorted = token[by_token]
    first_of_token = torch.cumsum(counts, 0) - counts
    choice = torch.arange(num_pairs, device=device) - first_of_token[token_sorted]
    pair_map = torch.full((meta.num_tokens, max_pairs), -1, dtype=torch.int64, device=device)
    pair_map[token_sorted, choice] = by_token
    adapter_map = torch.full_like(pair_map, -1)
    adapter_map[token_sorted, choice] = adapter[by_token]
    active = torch.nonzero(counts > 0).squeeze(1)
    combos, inverse, combo_counts = torch.unique(
        adapter_map[active], dim=0, return_inverse=True, return_counts=True
    )
    token_order = active[torch.argsort(inverse, stable=True)]
    group, starts, ends = _tiles_over_groups(combo_counts, block_m)
    return _CombinationTiles(
        max_pairs=max_pairs,
        token_order=token_order,
        token_pairs=pair_map[token_order].to(torch.int32),
        tiles=torch.stack([starts, ends]).to(torch.int32),
        tile_adapters=combos[group].to(torch.int32).contiguous(),
    )


@triton.jit
def _expand_kernel(
    h_ptr,
    b_ptr,
    out_ptr,
    tiles_ptr,
    tile_adapters_ptr,
    token_order_ptr,
    token_pairs_ptr,
    rank_offsets_ptr,
    n_tiles,
    h_out,
    stride_hp,
    stride_hr,
    stride_br,
    stride_bn,
    stride_ot,
    stride_on,
    MAX_PAIRS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One program: ``BLOCK_M`` tokens sharing one adapter combination x ``BLOCK_N`` outputs."""
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(tiles_ptr + tile)
    end = tl.load(tiles_ptr + n_tiles + tile)
    rows = start + tl.arange(0, BLOCK_M)
    mask_m = rows < end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < h_out
    offs_r = tl.arange(0, BLOCK_R)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in tl.static_range(MAX_PAIRS):
        slot = tl.load(tile_adapters_ptr + tile * MAX_PAIRS + j)
        has = slot >= 0
        safe_slot = tl.where(has, slot, 0)
        rank_start = tl.load(rank_offsets_ptr + safe_slot)
        rank = tl.where(has, tl.load(rank_offsets_ptr + safe_slot + 1) - rank_start, 0)
        pairs = tl.load(token_pairs_ptr + rows * MAX_PAIRS + j, mask=mask_m, other=0).to(tl.int64)
        for r in range(0, rank, BLOCK_R):
            mask_r = (r + offs_r) < rank
            h_tile = tl.load(
                h_ptr + pairs[:, None] * stride_hp + (r + offs_r)[None, :] * stride_hr,
                mask=mask_m[:, None] & mask_r[None, :],
                other=0.0,
            )
            b_rows = (rank_start + r + offs_r).to(tl.int64)
            b_tile = tl.load(
                b_ptr + b_rows[:, None] * stride_br + offs_n[None, :] * stride_bn,
                mask=mask_r[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc += _dot(h_tile.to(b_tile.dtype), b_tile, DOT_PRECISION, UPCAST)

    tokens = tl.load(token_order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    base = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (base + acc).to(out_ptr.dtype.element_ty), mask=mask)


def lora_expand(
    h: torch.Tensor, stack: LoraStack, meta: RoutingMetadata, out: torch.Tensor
) -> torch.Tensor:
    """Add every pair's ``B @ h`` to its token's output row, in place.

    Args:
        h: ``[P, R_max]`` from :func:`lora_shrink` (weights and scales already applied).
        stack: this layer's adapters by slot (``B`` is ``[H_out, r_a]``).
        meta: the forward's pairs grouped by adapter.
        out: ``[T, H_out]`` base output, updated in place.

    Returns:
        ``out``.

    Semantics::

        for p in range(P):
            t, a = meta.token_index[p], meta.pair_adapter[p]
            r = rank of adapter a in this layer (0 if absent)
            out[t] += stack.lora_b[a] @ h[p, :r]
    """
    if meta.num_pairs == 0 or stack.max_rank == 0:
        return out
    packed = stack.packed()
    block_m = _pick_block_m(meta)
    tiles = _combination_tiles(meta, block_m)
    h_out = out.shape[1]
    block_n = min(128, max(16, triton.next_power_of_2(h_out)))
    grid = (tiles.num_tiles, triton.cdiv(h_out, block_n))
    precision, upcast = _dot_options(packed.lora_b.dtype)
    _expand_kernel[grid](
        h,
        packed.lora_b,
        out,
        tiles.tiles,
        tiles.tile_adapters,
        tiles.token_order,
        tiles.token_pairs,
        packed.rank_offsets,
        tiles.num_tiles,
        h_out,
        h.stride(0),
        h.stride(1),
        packed.lora_b.stride(0),
        packed.lora_b.stride(1),
        out.stride(0),
        out.stride(1),
        MAX_PAIRS=tiles.max_pairs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_R=_rank_block(stack.max_rank),
        DOT_PRECISION=precision,
        UPCAST=upcast,
    )
    return out
