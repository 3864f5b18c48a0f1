"""Merging: adapters into one adapter, adapters into the base, a routed mixture into one adapter.

* :func:`merge_adapters` — a new adapter from several (``linear``, ``cat``, ``svd``, TIES,
  DARE, magnitude pruning, or any plugin strategy); PEFT format when saved.
* :func:`merge_into_base` / :func:`merge_and_unload` — fold adapters into the base weights
  (exact on dense bases; re-quantized with a measured :class:`MergeReport` on NF4).
* :func:`save_merged` — a dense (bf16) merged model that transformers loads.
* :func:`export_mixture` — the average routed mixture frozen into one static adapter.

A merge strategy is a pure tensor function with the signature documented in
:mod:`moa.merge.strategies`; register new ones with the ``moa_merge_strategies`` hook.
"""

from __future__ import annotations

from moa.merge.adapters import build_lora_adapter, merge_adapters
from moa.merge.export import ExportedMixture, average_routing, export_mixture
from moa.merge.into_base import (
    merge_and_unload,
    merge_into_base,
    resolve_mixture,
    save_merged,
    unload,
)
from moa.merge.report import LayerMergeError, MergeReport
from moa.merge.strategies import BUILTIN_STRATEGIES, MergeError

__all__ = [
    "BUILTIN_STRATEGIES",
    "ExportedMixture",
    "LayerMergeError",
    "MergeError",
    "MergeReport",
    "average_routing",
    "build_lora_adapter",
    "export_mixture",
    "merge_adapters",
    "merge_and_unload",
    "merge_into_base",
    "resolve_mixture",
    "save_merged",
    "unload",
]
