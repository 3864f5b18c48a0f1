"""The running rows' KV caches as one left-padded batch cache.

Rows arrive with caches of different lengths. Their keys/values are stacked along the
batch dimension, each row left-padded to the longest, with an attention mask that hides
the padding; every row keeps its own positions (``position_ids``), so a row computes what
it computes alone. The stack is rebuilt only when a row joins or leaves (as TGI's
``concatenate``/``filter``), never per step; leading columns that only pad are trimmed
when rows leave.

Built on transformers' :class:`~transformers.DynamicCache` and its public layer tensors
(``layers[i].keys`` / ``.values``, ``[batch, kv_heads, seq, head_dim]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import inspect

import torch
import torch.nn.functional as F

from moa.errors import MoaError


def new_cache(model: Any) -> Any:
    """An empty :class:`~transformers.DynamicCache` for ``model``'s base."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_argument(model: Any) -> str:
    """The name the base's forward takes its KV cache by (``cache`` in transformers >= 5.2x,
    ``past_key_values`` before). The cache object is updated in place either way."""
    return "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"


def prefill_inputs(prompt_ids: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The inputs of one prompt's prefill (no padding), as ``generate`` builds them."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(ids.shape[1], device=device)[None],
    }


def layer_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the cache's ``(keys, values)`` ``[batch, kv_heads, seq, head_dim]``."""
    tensors = []
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise MoaError(
                f"Serving batches need plain dynamic KV cache layers; this base uses "
                f"{type(layer).__name__}. Serve it with --deterministic (one row per forward)."
            )
        tensors.append((layer.keys, layer.values))
    return tensors


def _cache_from(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(tensors):
        cache.update(keys, values, index)
    return cache


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[-2]
    return F.pad(tensor, (0, 0, missing, 0)) if missing > 0 else tensor


def _stack(
    mine: list[tuple[torch.Tensor, torch.Tensor]],
    mask: torch.Tensor,
    rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]],
) -> tuple[Any, torch.Tensor]:
    """``mine`` (per layer ``[B, ...]``, ``B`` may be 0) with ``rows`` appended, left-padded to
    one length: the new cache and its ``[B + len(rows), L]`` mask."""
    lengths = [row[0][0].shape[-2] for row in rows]
    length = max([mask.shape[1], *lengths])
    stacked = []
    for index in range(len(rows[0])):
        keys = [_pad_left(row[index][0], length) for row in rows]
        values = [_pad_left(row[index][1], length) for row in rows]
        if mine:
            keys.insert(0, _pad_left(mine[index][0], length))
            values.insert(0, _pad_left(mine[index][1], length))
        stacked.append((torch.cat(keys), torch.cat(values)))
    new_masks = [F.pad(torch.ones(1, n, dtype=mask.dtype, device=mask.device), (length - n, 0)) for n in lengths]
    return _cache_from(stacked), torch.cat([F.pad(mask, (length - mask.shape[1], 0)), *new_masks])


class BatchCache:
    """Left-padded KV caches of the running rows, in the rows' order.

    Attributes:
        cache: The stacked :class:`~transformers.DynamicCache`.
        mask: ``[B, L]`` 1 on real positions, 0 on padding.
    """

    def __init__(self, cache: Any, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask

    @classmethod
    def from_rows(cls, rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]) -> BatchCache:
        """A batch of prefilled rows (per row, per layer ``(keys, values)`` of batch 1)."""
        empty = torch.zeros(0, 0, dtype=torch.long, device=rows[0][0][0].device)
        return cls(*_stack([], empty, rows))

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return int(self.mask.shape[0])

    def join_rows(self, rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Append prefilled rows (per row, per layer ``(keys, values)`` of batch 1), in order.

        The whole stack is rebuilt once, however many rows join.
        """
        self.cache, self.mask = _stack(layer_tensors(self.cache), self.mask, rows)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); trim columns that only pad."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        self.cache = _cache_from([
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in layer_tensors(self.cache)
        ])

    def attention_mask(self) -> torch.Tensor:
        """``[B, L + 1]``: the mask of a step that adds one token per row."""
        ones = torch.ones(self.size, 1, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1)

    def restore(self, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put back the per-layer keys/values read with :func:`layer_tensors` before a step
        that failed (a forward may have grown some layers before it raised)."""
        self.cache = _cache_from(tensors)

    def step_inputs(
        self, tokens: Sequence[int], positions: Sequence[int], device: torch.device, cache_key: str
    ) -> dict[str, Any]:
        """The inputs of one decode step: each row's last token at its own position."""
        return {
            "input_ids": torch.tensor([[t] for t in tokens], dtype=torch.long, device=device),
            "position_ids": torch.tensor([[p] for p in positions], dtype=torch.long, device=device),
            "attention_mask": self.attention_mask(),
            cache_key: self.cache,
        }

    def advance(self) -> None:
        """Record the step just run (the cache grew in place: one more real position per row)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
