"""Contiguous token runs inside each adapter's group of pairs (torch path only).

A row-level decision gives every adapter whole rows, i.e. long runs of consecutive
tokens. For those, the torch path reads ``x[run]`` and adds into ``out[run]`` directly
(an in-place ``addmm_`` on a contiguous slice) instead of gathering rows and
scattering a temporary ``[n, H_out]`` product back with ``index_add_``, which halves the
memory traffic of the expand on the CPU. Fragmented groups (decode steps: one token per
row) keep the gather/scatter path.
"""

from __future__ import annotations

import torch

from moa.kernels.metadata import RoutingMetadata

#: Below this mean run length, gather/scatter is cheaper than one matmul per run.
MIN_MEAN_RUN = 16

#: slot -> [(pair_start, pair_end, first_token)], or None when runs are too short.
Runs = dict[int, list[tuple[int, int, int]]] | None


def _build(meta: RoutingMetadata) -> Runs:
    pairs = meta.num_pairs
    if pairs == 0:
        return {}
    tokens, adapters = meta.token_index, meta.pair_adapter
    starts_mask = torch.ones(pairs, dtype=torch.bool, device=tokens.device)
    starts_mask[1:] = (tokens[1:] - tokens[:-1] != 1) | (adapters[1:] != adapters[:-1])
    starts = starts_mask.nonzero().flatten()
    if pairs < MIN_MEAN_RUN * len(starts):
        return None
    start_list = starts.tolist()
    first_tokens = tokens[starts].tolist()
    ends = [*start_list[1:], pairs]
    runs: dict[int, list[tuple[int, int, int]]] = {}
    run = 0
    for slot in meta.active_adapters:
        group_end = meta.offsets[slot + 1]
        runs[slot] = []
        while run < len(start_list) and start_list[run] < group_end:
            runs[slot].append((start_list[run], ends[run], first_tokens[run]))
            run += 1
    return runs


def token_runs(meta: RoutingMetadata) -> Runs:
    """The runs of ``meta`` (computed once per forward, shared by every layer)."""
    return meta.extra("reference_token_runs", lambda: _build(meta))
