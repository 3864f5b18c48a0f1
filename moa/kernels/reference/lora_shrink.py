"""Weighted multi-adapter LoRA shrink (torch reference).

Follows Punica's SGMV / S-LoRA grouping (tokens grouped by adapter, one pass per
group) and adds a routing weight per (token, adapter) pair, so a token can mix k
adapters; the weight and the adapter's scale are folded into the rank-r
intermediate, where they cost r multiplies instead of H_out.
"""

from __future__ import annotations

import torch

from moa.kernels.metadata import LoraStack, RoutingMetadata
from moa.kernels.runs import token_runs


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
    h = torch.zeros(meta.num_pairs, stack.max_rank, dtype=x.dtype, device=x.device)
    runs = token_runs(meta)
    for slot in meta.active_adapters:
        lora_a = stack.lora_a[slot]
        if lora_a is None:
            continue
        start, end = meta.pairs_of(slot)
        rank = lora_a.shape[0]
        coeff = meta.pair_weight[start:end].to(x.dtype) * stack.scales[slot]
        if runs is not None:  # read x[run] in place: no gather
            for pair_start, pair_end, token in runs[slot]:
                h[pair_start:pair_end, :rank] = x[token : token + pair_end - pair_start] @ lora_a.t()
            h[start:end, :rank] *= coeff[:, None]
        else:
            rows = x.index_select(0, meta.token_index[start:end])
            h[start:end, :rank] = (rows @ lora_a.t()) * coeff[:, None]
    return h
