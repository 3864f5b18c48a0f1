"""The running rows' KV caches as one left-padded batch cache, in buffers with spare room.

Rows arrive with caches of different lengths. Their keys/values sit along the batch
dimension, each row right-aligned to the batch's last column (left-padded), with an
attention mask that hides the padding; every row keeps its own positions
(``position_ids``), so a row computes what it computes alone.

Every layer's keys and values live in preallocated buffers ``[slots, kv_heads, capacity,
head_dim]`` (:class:`SlotLayer`): rows ``[0, B)`` are the running rows, columns ``[start,
end)`` the used ones. So no operation copies the whole cache (transformers'
``DynamicLayer`` concatenates it at every step, and restacking it when a row joins or leaves
cost about 60 ms a time on the default base, 16 rows, as much as a fifth of a decode step):

* a step writes one column per row in place (the buffer grows, rarely, by a quarter);
* a joining row is written into the next free slot, right-aligned to ``end``; the used
  columns only move left (rows padded with zeros) when its prompt is longer than them;
* a leaving row's slot is closed up by moving the rows after it down, in order; columns
  that only pad at the left are dropped by moving ``start``.

The layers are transformers cache layers (``keys`` / ``values`` are views of the used part,
``[B, kv_heads, L, head_dim]``), held in a transformers :class:`~transformers.Cache`, so the
base's attention reads and grows them as it would a ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import inspect

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

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


#: Spare columns a new buffer gets on each side, and the least a full one grows by.
_SPARE_COLUMNS = 64
#: Slots a buffer keeps at least when it shrinks.
_MIN_SLOTS = 8


class SlotLayer(DynamicLayer):
    """One decoder layer's keys/values of the running rows, in buffers with spare room.

    Args:
        keys: ``[slots, kv_heads, capacity, head_dim]`` key buffer (values: the same shape).
        values: The value buffer.
        rows: Running rows (slots ``[0, rows)``).
        start: First used column.
        end: One past the last used column (the next step writes there).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: int, start: int, end: int):
        super().__init__()
        self.key_buffer, self.value_buffer = keys, values
        self.rows, self.start, self.end = rows, start, end
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self.refresh()

    def refresh(self) -> None:
        """Point ``keys`` / ``values`` at the used part (after ``rows``/``start``/``end`` moved)."""
        self.keys = self.key_buffer[: self.rows, :, self.start: self.end]
        self.values = self.value_buffer[: self.rows, :, self.start: self.end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a step's ``[rows, kv_heads, n, head_dim]`` keys/values after the used columns."""
        n = key_states.shape[-2]
        if key_states.shape[0] != self.rows:
            raise MoaError(f"This batch cache holds {self.rows} rows; a step gave keys for {key_states.shape[0]}.")
        if self.end + n > self.key_buffer.shape[2]:
            # full: move the used part back to the left (columns left of ``start`` only padded
            # rows that have left; without this a server that never empties its batch would
            # grow the buffers forever) and leave room for a quarter more
            width = self.end - self.start + n
            self.resize(self.key_buffer.shape[0], 2 * _SPARE_COLUMNS + width + width // 4, _SPARE_COLUMNS - self.start)
        self.key_buffer[: self.rows, :, self.end: self.end + n] = key_states
        self.value_buffer[: self.rows, :, self.end: self.end + n] = value_states
        self.end += n
        self.refresh()
        return self.keys, self.values

    def resize(self, slots: int, capacity: int, shift: int) -> None:
        """New buffers of ``slots`` x ``capacity``; the used part moves ``shift`` columns right
        (left when negative).

        Left uninitialised (not zeroed): a column is read only once written: the used part is
        copied here, a joining row's padding is zeroed where it is written, and a step writes
        its column before attending to it. Zeroing a whole buffer of many slots and a long
        prompt's width stalled a step for seconds.
        """
        keys = self.key_buffer.new_empty(slots, self.key_buffer.shape[1], capacity, self.key_buffer.shape[3])
        values = torch.empty_like(keys)
        used = slice(self.start + shift, self.end + shift)
        keys[: self.rows, :, used] = self.keys
        values[: self.rows, :, used] = self.values
        self.key_buffer, self.value_buffer = keys, values
        self.start, self.end = self.start + shift, self.end + shift
        self.refresh()


class BatchCache:
    """Left-padded KV caches of the running rows, in the rows' order.

    Attributes:
        cache: The transformers :class:`~transformers.Cache` of :class:`SlotLayer` s.
        mask: ``[B, L]`` 1 on real positions, 0 on padding.
    """

    def __init__(self, layers: list[SlotLayer], mask: torch.Tensor):
        self.cache = Cache(layers=layers)
        self.mask = mask

    @classmethod
    def from_rows(cls, rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]) -> BatchCache:
        """A batch of prefilled rows (per row, per layer ``(keys, values)`` of batch 1)."""
        first = rows[0][0][0]
        length = max(row[0][0].shape[-2] for row in rows)
        layers = []
        for keys, _ in rows[0]:
            shape = (len(rows), keys.shape[1], length + 2 * _SPARE_COLUMNS, keys.shape[3])
            layers.append(SlotLayer(keys.new_zeros(shape), keys.new_zeros(shape), 0, _SPARE_COLUMNS + length,
                                    _SPARE_COLUMNS + length))
        batch = cls(layers, torch.zeros(0, 0, dtype=torch.long, device=first.device))
        batch.join_rows(rows)
        return batch

    @property
    def layers(self) -> list[SlotLayer]:
        return self.cache.layers

    @property
    def size(self) -> int:
        """Rows in the batch."""
        return int(self.mask.shape[0])

    def join_rows(self, rows: Sequence[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Append prefilled rows (per row, per layer ``(keys, values)`` of batch 1), in order."""
        lengths = [row[0][0].shape[-2] for row in rows]
        layer0 = self.layers[0]
        end, start, size = layer0.end, layer0.start, self.size
        new_start = min([start, *(end - n for n in lengths)])
        slots = layer0.key_buffer.shape[0]
        if new_start < 0 or size + len(rows) > slots:  # no room: bigger buffers, the used part moved right
            shift = max(0, -new_start + _SPARE_COLUMNS) if new_start < 0 else 0
            # more slots only when the rows need them (a long prompt needs columns, not slots)
            grown = slots if size + len(rows) <= slots else max(size + len(rows), 2 * slots)
            for layer in self.layers:
                layer.resize(grown, layer.key_buffer.shape[2] + shift, shift)
            end, start, new_start = end + shift, start + shift, new_start + shift
        for index, layer in enumerate(self.layers):
            if new_start < start:  # the existing rows are padded further left (stale columns zeroed)
                layer.key_buffer[:size, :, new_start:start] = 0
                layer.value_buffer[:size, :, new_start:start] = 0
            for offset, (row, n) in enumerate(zip(rows, lengths, strict=True)):
                slot = size + offset
                keys, values = row[index]
                layer.key_buffer[slot, :, new_start: end - n] = 0
                layer.value_buffer[slot, :, new_start: end - n] = 0
                layer.key_buffer[slot, :, end - n: end] = keys[0]
                layer.value_buffer[slot, :, end - n: end] = values[0]
            layer.rows, layer.start = size + len(rows), new_start
            layer.refresh()
        width = end - new_start
        new_masks = [F.pad(torch.ones(1, n, dtype=torch.long, device=self.mask.device), (width - n, 0)) for n in lengths]
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)), *new_masks])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); drop columns that only pad."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        drop = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, drop:]
        moved = next((i for i, row in enumerate(rows) if row != i), None)
        for layer in self.layers:
            if moved is not None:  # close up the slots of the rows that left, in order
                source = index[moved:]
                columns = slice(layer.start, layer.end)
                layer.key_buffer[moved: len(rows), :, columns] = layer.key_buffer[source, :, columns]
                layer.value_buffer[moved: len(rows), :, columns] = layer.value_buffer[source, :, columns]
            layer.rows, layer.start = len(rows), layer.start + drop
            layer.refresh()
        self._compact()

    def _compact(self) -> None:
        """Give back buffers far larger than the rows left need (a burst of rows, a long prompt
        that has left): a server's cache then shrinks back instead of keeping its peak for good."""
        layer0 = self.layers[0]
        slots, capacity = layer0.key_buffer.shape[0], layer0.key_buffer.shape[2]
        width = layer0.end - layer0.start
        fit_slots = max(2 * layer0.rows, _MIN_SLOTS)
        fit_capacity = 2 * _SPARE_COLUMNS + width + width // 4
        if slots > 2 * fit_slots or capacity > 4 * fit_capacity:
            for layer in self.layers:
                layer.resize(min(slots, fit_slots), fit_capacity, _SPARE_COLUMNS - layer.start)

    def snapshot(self) -> list[int]:
        """Each layer's used width, to :meth:`restore` after a step that failed."""
        return [layer.end - layer.start for layer in self.layers]

    def restore(self, widths: list[int]) -> None:
        """Forget what a failed step wrote (a forward may have grown, even moved, some layers
        before it raised): each layer keeps its first ``widths`` used columns."""
        for layer, width in zip(self.layers, widths, strict=True):
            layer.end = layer.start + width
            layer.refresh()

    def attention_mask(self) -> torch.Tensor:
        """``[B, L + 1]``: the mask of a step that adds one token per row."""
        ones = torch.ones(self.size, 1, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1)

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
