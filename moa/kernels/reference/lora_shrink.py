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
    max_rank = stack.max_rank
    h = torch.zeros(meta.num_pairs, max_rank, dtype=x.dtype, device=x.device)
    if meta.num_pairs == 0 or max_rank == 0:
        return h
    # Rows are read in place over contiguous token runs (row-level routing), else gathered
    # once for all pairs; each product goes straight into h, and one multiply applies every
    # pair's weight and scale.
    runs = token_runs(meta)
    rows = None if runs is not None else x.index_select(0, meta.token_index)
    in_place = not torch.is_grad_enabled()  # mm(out=...) has no autograd
    for slot in meta.active_adapters:
        lora_a = stack.lora_a[slot]
        if lora_a is None:
            continue
        start, end = meta.pairs_of(slot)
        rank = lora_a.shape[0]
        pieces = [(s, e, x[t : t + e - s]) for s, e, t in runs[slot]] if runs is not None else [
            (start, end, rows[start:end])
        ]
        for piece_start, piece_end, piece in pieces:
            if rank == max_rank and in_place:
                torch.mm(piece, lora_a.t(), out=h[piece_start:piece_end])
            else:
                h[piece_start:piece_end, :rank] = piece @ lora_a.t()
    scales = torch.tensor(stack.scales, dtype=x.dtype, device=x.device)
    h *= (meta.pair_weight.to(x.dtype) * scales[meta.pair_adapter.long()])[:, None]
    return h
