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
nothing). It reads each adapter's weights once, like the grouped path, and computes
``T x R_total`` ranks instead of the routed ones, so it is used only when that waste is
smaller than the grouped path's per-adapter overhead (:func:`prefer_dense`); no gradient
(training keeps the explicit autograd path).
"""

from __future__ import annotations

import torch

from moa.kernels.metadata import LoraStack, PackedLora, RoutingMetadata

#: The fixed cost of one adapter group in the grouped path, in (token x rank) units of work.
GROUP_OVERHEAD = 4096


def prefer_dense(stack: LoraStack, meta: RoutingMetadata) -> bool:
    """Whether the dense strategy is cheaper for this layer and forward."""
    ranks = stack.ranks
    total = sum(ranks)
    if total == 0:
        return False
    routed = 0
    active = 0
    for slot in meta.active_adapters:
        if ranks[slot]:
            start, end = meta.pairs_of(slot)
            routed += (end - start) * ranks[slot]
            active += 1
    return meta.num_tokens * total <= 2 * routed + GROUP_OVERHEAD * active


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

    return meta.extra(("dense_coefficients", tuple(ranks), tuple(stack.scales), dtype), build)


def lora_dense(x: torch.Tensor, stack: LoraStack, meta: RoutingMetadata, out: torch.Tensor) -> torch.Tensor:
    """``out + sum_p w_p s_a B_a A_a x[t_p]`` by two GEMMs over every adapter of the layer.

    Args:
        x: ``[T, H_in]`` in the adapters' dtype.
        stack: The layer's adapters by slot.
        meta: The forward's routing pairs.
        out: ``[T, H_out]``, updated in place.

    Returns:
        ``out``.
    """
    packed = stack.packed()
    h = x @ packed.lora_a.t()
    h *= _coefficients(stack, packed, meta, h.dtype)
    if out.dtype == h.dtype:
        return out.addmm_(h, packed.lora_b)
    return out.add_((h @ packed.lora_b).to(out.dtype))
