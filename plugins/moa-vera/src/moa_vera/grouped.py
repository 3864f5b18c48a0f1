"""VeRA's grouped form: one module's VeRA adapters that share a projection, computed together.

moa calls :meth:`VeraLayer.grouped_delta <moa_vera.VeraLayer.grouped_delta>` once per module
and forward with every row routed to that module's VeRA adapters (on the generic path). The
adapters whose frozen matrices are the same object (same ``projection_prng_key``, ``r`` and
widths, or equal matrices from files: :mod:`moa_vera.projection` holds those once) form a
group, and a group of ``G`` adapters costs one ``A`` GEMM and one ``B`` GEMM over all its
rows instead of ``G`` of each::

    h = A x                          for every row of the group at once
    y = lambda_b[a] ⊙ (B (lambda_d[a] ⊙ h))   with a = each row's adapter

Adapters alone in their group take :meth:`~moa_vera.VeraLayer.delta` as before.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from moa.adapters.base import GroupedRows
    from moa_vera.layer import VeraLayer


def group_by_projection(layers: tuple[VeraLayer, ...]) -> list[list[int]]:
    """Positions in ``layers`` grouped by shared matrices (and the vectors' device and dtype), in order.

    Args:
        layers: VeRA layers of one module.

    Returns:
        Lists of positions, each ascending; groups ordered by their first position.
    """
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        vector = layer.vera_lambda_d
        groups.setdefault((id(layer.projection.pair()), vector.device, vector.dtype), []).append(i)
    return list(groups.values())


def grouped_vera_delta(x: torch.Tensor, rows: GroupedRows, base_layer: nn.Module) -> torch.Tensor | None:
    """Every pair's ``delta`` (unweighted, in ``rows``' pair order), or ``None`` when nothing is shared.

    Args:
        x: ``[T, H_in]``, every row at this module.
        rows: The pairs routed to the module's VeRA adapters (see ``moa.adapters.base.GroupedRows``).
        base_layer: The wrapped base layer (unused by VeRA; passed to ``delta``).

    Returns:
        ``[rows.num_pairs, H_out]``, or ``None``: while training with dropout (``delta`` draws
        a mask per adapter, which one shared shrink could not), or when no two adapters share
        a projection (then the per-adapter path is the same work).
    """
    layers = rows.layers
    if any(layer.training and layer.dropout > 0 for layer in layers):
        return None
    groups = group_by_projection(layers)
    if all(len(group) == 1 for group in groups):
        return None
    if len(groups) == 1:
        return shared_shrink(x, rows, groups[0])  # the usual case: every pair, in order
    parts: list[torch.Tensor | None] = [None] * len(layers)
    for group in groups:
        if len(group) == 1:
            start, end = rows.span(group[0])
            parts[group[0]] = layers[group[0]].delta(x.index_select(0, rows.token_index[start:end]), base_layer)
        else:
            counts = [rows.span(i)[1] - rows.span(i)[0] for i in group]
            for i, part in zip(group, shared_shrink(x, rows, group).split(counts), strict=True):
                parts[i] = part
    return torch.cat(parts)


@functools.lru_cache(maxsize=64)
def pair_owner(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``[sum(counts)]`` int64: ``i`` repeated ``counts[i]`` times (each pair's adapter in its group).

    Cached: the layers of one forward see the same counts, and a decode step's are small.
    """
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64)).to(device)


def shared_shrink(x: torch.Tensor, rows: GroupedRows, group: list[int]) -> torch.Tensor:
    """The deltas of the pairs of the adapters at ``group`` (one projection), adapter by adapter.

    The same elementwise products as :meth:`~moa_vera.VeraLayer.delta`, in the same order,
    so each row differs from its per-adapter result only by the GEMMs' summation order.

    Args:
        x: ``[T, H_in]``.
        rows: The pairs (``rows.layers[i]`` gets ``rows.span(i)``).
        group: Ascending positions in ``rows.layers`` sharing one projection, device and dtype.

    Returns:
        ``[sum of n_i, H_out]``: the ``n_i`` pairs of each position of ``group``, in that order.
    """
    layers = [rows.layers[i] for i in group]
    spans = [rows.span(i) for i in group]
    counts = [end - start for start, end in spans]
    if all(spans[k][1] == spans[k + 1][0] for k in range(len(spans) - 1)):
        index = rows.token_index[spans[0][0]:spans[-1][1]]  # the usual case: the group's pairs are adjacent
    else:
        index = torch.cat([rows.token_index[start:end] for start, end in spans])
    first = layers[0]
    lambda_d = first.vera_lambda_d
    vera_a, vera_b = first.projection.slices(first.in_features, first.out_features, lambda_d.device, lambda_d.dtype)
    owner = pair_owner(tuple(counts), lambda_d.device)
    lambda_ds = torch.stack([layer.vera_lambda_d for layer in layers]).index_select(0, owner)
    lambda_bs = torch.stack([layer.vera_lambda_b for layer in layers]).index_select(0, owner)
    shrunk = F.linear(x.index_select(0, index).to(lambda_d.dtype), vera_a)
    return lambda_bs * F.linear(lambda_ds * shrunk, vera_b)
