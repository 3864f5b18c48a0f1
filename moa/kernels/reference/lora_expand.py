"""Weighted multi-adapter LoRA expand (torch reference).

The second half of Punica's SGMV / S-LoRA pair: each pair's rank-r intermediate is
expanded by its adapter's B and added to its token's output row (several pairs of one
token, k > 1, accumulate).
"""

from __future__ import annotations

import torch

from moa.kernels.metadata import LoraStack, RoutingMetadata
from moa.kernels.runs import token_runs


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
    runs = token_runs(meta) if h.dtype == out.dtype and not out.requires_grad else None
    for slot in meta.active_adapters:
        lora_b = stack.lora_b[slot]
        if lora_b is None:
            continue
        start, end = meta.pairs_of(slot)
        rank = lora_b.shape[1]
        if runs is not None:  # add into out[run] in place: no temporary, no scatter
            for pair_start, pair_end, token in runs[slot]:
                rows = out[token : token + pair_end - pair_start]
                rows.addmm_(h[pair_start:pair_end, :rank], lora_b.t())
        else:
            delta = (h[start:end, :rank] @ lora_b.t()).to(out.dtype)
            out.index_add_(0, meta.token_index[start:end], delta)
    return out
