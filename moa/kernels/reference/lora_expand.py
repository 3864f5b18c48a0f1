"""Weighted multi-adapter LoRA expand (torch reference).

The second half of Punica's SGMV / S-LoRA pair: each pair's rank-r intermediate is
expanded by its adapter's B and added to its token's output row (several pairs of one
token, k > 1, accumulate).
"""

from __future__ import annotations

import torch

from moa.kernels.metadata import LoraStack, RoutingMetadata


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
    for slot in meta.active_adapters:
        lora_b = stack.lora_b[slot]
        if lora_b is None:
            continue
        start, end = meta.pairs_of(slot)
        rank = lora_b.shape[1]
        delta = (h[start:end, :rank] @ lora_b.t()).to(out.dtype)
        if meta.identity_adapter == slot:
            out.add_(delta)
        else:
            out.index_add_(0, meta.token_index[start:end], delta)
    return out
