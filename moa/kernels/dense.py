"""A torch strategy for few tokens: every adapter of the layer on every token, two GEMMs.

The grouped reference (``reference/lora_shrink`` + ``lora_expand``) runs a handful of small
ops per active adapter: right for long prompts, but a decode step of 16 rows over 8
adapters then pays ~60 tiny ops per layer, and on a CPU their fixed cost dominates. Here
the layer's packed ``A``/``B`` buffers (all adapters, contiguous, built once per stack
version) serve the whole batch in one shrink and one expand::

    h   = x @ A_all^T                      # [T, R_total], every adapter's rank block
    h  *= coeff                            # coeff[t, cols of a] = sum of w(t, a) * scale_a, else 0
    out += h @ B_all                       # [T, H_out]

which is exactly ``y[t] = out[t] + sum_p w_p s_a B_a A_a x[t]`` (the zero columns add
nothing). The expand runs per active adapter over its own columns (when every adapter is
routed and ranks are equal, as one batched GEMM with the same per-adapter products), the
products are summed in slot order and then added, so a row's bits never depend on which
other adapters are loaded or which other rows are in the batch. It reads
each adapter's weights once, like the grouped path, and computes ``T x R_total`` ranks
instead of the routed ones, so it is used only when that waste is smaller than the grouped
path's per-adapter overhead (:func:`prefer_dense`). Plain torch ops: autograd differentiates
it (x, A, B and the routing weights) whether or not gradients are recorded, so a forward
gives the same bits in both modes.
"""

from __future__ import annotations

import torch

from moa.kernels.metadata import LoraStack, PackedLora, RoutingMetadata

#: The fixed cost of one adapter group in the grouped path, in (token x rank) units of work.
GROUP_OVERHEAD = 4096
#: Below this many adapters torch sums a dimension in order, like a running sum (checked in
#: tests/kernels); from it on the batched expand is not used.
_SEQUENTIAL_SUM = 16


def prefer_dense(stack: LoraStack, meta: RoutingMetadata) -> bool:
    """Whether the dense strategy is cheaper for this layer and forward.

    Decided from the routed adapters only (never from others merely loaded), so loading or
    removing an unused adapter never switches a forward to another strategy. Float32
    adapters only: the grouped reference accumulates 16-bit adapters in float32.
    """
    if stack.dtype() != torch.float32:
        return False
    ranks = stack.ranks

    def decide() -> bool:  # once per forward and rank layout, not once per layer
        routed = active_ranks = active = 0
        for slot in meta.active_adapters:
            if ranks[slot]:
                start, end = meta.pairs_of(slot)
                routed += (end - start) * ranks[slot]
                active_ranks += ranks[slot]
                active += 1
        return active > 0 and meta.num_tokens * active_ranks <= 2 * routed + GROUP_OVERHEAD * active

    return meta.extra(("prefer_dense", ranks), decide)


def _coefficients(stack: LoraStack, packed: PackedLora, meta: RoutingMetadata, dtype: torch.dtype) -> torch.Tensor:
    """``[T, R_total]``: each rank column's routing weight x scale, per token (shared per layout)."""
    ranks = stack.ranks

    def build() -> torch.Tensor:
        device = meta.token_index.device
        per_slot = torch.zeros(meta.num_tokens, len(ranks), dtype=torch.float32, device=device)
        per_slot.index_put_((meta.token_index, meta.pair_adapter.long()), meta.pair_weight.float(), accumulate=True)
        per_slot *= packed.scales.to(device)
        column_slot = torch.repeat_interleave(torch.arange(len(ranks), device=device),
                                              torch.tensor(ranks, device=device))
        return per_slot[:, column_slot].to(dtype)

    return meta.extra(("dense_coefficients", ranks, tuple(stack.scales), dtype), build)


def _layout(packed: PackedLora, ranks: tuple[int, ...], meta: RoutingMetadata
            ) -> tuple[list[int], list[int], tuple[int, int] | None]:
    """Rank offsets, the routed slots that have weights (in slot order), and their rows' span.

    The span ``(first row, end row)`` is given when the routed adapters' rows are back to
    back (no adapter that is loaded but not routed has rows between them): one shrink then
    serves them all. It is decided from the routed adapters alone: loading an adapter (the
    bank appends it) or removing one outside the span never changes a row's bits.
    """
    offsets = packed.rank_offsets.tolist()
    active = [slot for slot in meta.active_adapters if ranks[slot]]
    if not active:
        return offsets, active, None
    routed = set(active)
    between = [slot for slot in range(active[0], active[-1] + 1) if ranks[slot]]
    span = (offsets[active[0]], offsets[active[-1] + 1]) if all(s in routed for s in between) else None
    return offsets, active, span


def lora_dense(x: torch.Tensor, stack: LoraStack, meta: RoutingMetadata, out: torch.Tensor) -> torch.Tensor:
    """``out + sum_p w_p s_a B_a A_a x[t_p]``: one shrink over every adapter, one expand per active one.

    Args:
        x: ``[T, H_in]`` in the adapters' dtype.
        stack: The layer's adapters by slot.
        meta: The forward's routing pairs.
        out: ``[T, H_out]``; updated in place when no gradient is recorded.

    Returns:
        The result (``out`` itself when updated in place).
    """
    packed = stack.packed()
    ranks = stack.ranks
    offsets, active, span = meta.extra(("dense_layout", ranks), lambda: _layout(packed, ranks, meta))
    tracking = torch.is_grad_enabled()
    coefficients = _coefficients(stack, packed, meta, x.dtype)
    # the routed adapters' rows back to back (a decode step): one shrink and one scaling over
    # their columns; else one per routed adapter, so unused adapters cost nothing
    low, high = span if span is not None else (0, 0)
    scaled = x @ packed.lora_a[low:high].t() * coefficients[:, low:high] if span is not None else None
    cast = out.dtype != x.dtype
    # One expand per routed adapter over its own rank columns (not one over all columns: a
    # running sum over k is not bit-stable when zero columns are added, so a row's result
    # would depend on which other adapters are loaded). The adapters' products are summed
    # in slot order, then added to ``out``; the rows that do not use an adapter add exact
    # zeros, so a row's sum is the same whichever other adapters and rows are present.
    rank = ranks[active[0]] if active else 0
    if scaled is not None and not cast and 1 < len(active) < _SEQUENTIAL_SUM and all(ranks[s] == rank for s in active):
        # every adapter routed, equal ranks: all the expands in one batched GEMM; its
        # per-adapter products equal the loop's, and a sum over fewer than 16 adapters
        # runs in slot order, as the loop's running sum does
        per_adapter = torch.bmm(scaled.view(-1, len(active), rank).transpose(0, 1),
                                packed.lora_b[low:high].view(len(active), rank, -1))
        delta = per_adapter.sum(0)
    else:
        delta = None
        for slot in active:
            start, end = offsets[slot], offsets[slot + 1]
            if scaled is not None:
                h = scaled[:, start - low:end - low]
            else:
                h = x @ packed.lora_a[start:end].t() * coefficients[:, start:end]
            lora_b = packed.lora_b[start:end]
            if cast:
                h, lora_b = h.to(out.dtype), lora_b.to(out.dtype)
            product = h @ lora_b
            delta = product if delta is None else (delta + product if tracking else delta.add_(product))
    if delta is None:
        return out
    return out + delta if tracking else out.add_(delta)
