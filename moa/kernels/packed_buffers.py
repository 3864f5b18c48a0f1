"""One layer's packed adapter buffers, kept across layouts and updated in place.

:meth:`LoraStack.packed` hands the kernels every adapter's ``A`` rows (and ``B``
transposed) back to back in slot order, with ``rank_offsets``. A new stack is made each
time adapters come or go, and packing it from scratch copies *every* adapter's weights: a
server that loads and evicts adapters all day re-copies all of them at each change. This
arena keeps one pair of row buffers per layer for the layer's whole life and, when a stack
of a new layout asks for its buffers, changes only the rows that differ:

* a new adapter (the bank always appends one at the last slot) copies its own rows into
  the free room after the last row;
* a removed adapter closes its gap by moving the rows on its *shorter* side (the rows
  before it move towards the end, or the rows after it move towards the start), so
  removing the first or the last adapter copies nothing, and the least recently used
  adapter, usually one of the oldest, moves few rows;
* an adapter whose weights changed in place (an optimizer step, ``param.data = ...``)
  has its own rows copied again.

Several changes between two packings (the serving cache evicts and loads in one engine
call) are handled together: the adapters kept are found by identity, in order.

Why not zero copies: the kernels (Triton shrink/expand, the dense torch path) read each
slot's rows as ``[rank_offsets[s], rank_offsets[s + 1])`` of one contiguous block, so a
removed adapter's rows cannot stay as a hole. When the free room at the end runs out the
live rows are moved once (to the start of the same buffers, or into new ones 1.5x larger,
as a vector grows), which amortises to a constant number of copies per row added;
buffers mostly empty are shrunk the same way.

The returned :class:`PackedLora` is a view of the arena, valid for the stack's layout:
the model's bank changes layouts only while no call runs (its write lock), and every call
of one layout asks for the same rows, so a view is never rewritten while a call reads it.
The arena's own lock serialises the calls that update it. On a GPU the row moves are
queued on the current stream, after the kernels of the calls before the change.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moa.kernels.metadata import LoraStack, PackedLora

#: Free rows kept after the live ones at least, when the buffers are (re)allocated (else
#: half the live rows: at most 1.5x the memory of a tight packing).
MIN_FREE_ROWS = 16


def tensor_key(t: torch.Tensor) -> tuple:
    """The identity of ``t``'s current values: storage, view geometry and write count.

    An inference tensor has no write counter; nothing updates one in place (a new value
    is a new tensor), so its storage identifies it.
    """
    version = 0 if t.is_inference() else t._version  # noqa: SLF001 - torch's public write counter
    return (t.data_ptr(), tuple(t.shape), t.stride(), version)


@dataclass
class _Segment:
    """One adapter's rows in the arena: the tensors they were copied from, and their key.

    The tensors are held weakly: an arena must not keep a removed adapter's weights alive,
    and a dead reference never matches, so freed memory reused by a new tensor cannot pass
    for the old one.
    """

    a_ref: weakref.ref
    b_ref: weakref.ref
    key: tuple
    rows: int

    def matches(self, a: torch.Tensor, b: torch.Tensor, key: tuple) -> bool:
        return self.a_ref() is a and self.b_ref() is b and self.key == key


def _dead() -> None:
    """A weak reference that is always dead (a segment whose rows are being filled)."""
    return None


class PackedBuffers:
    """A layer's packed ``A`` / ``B^T`` rows, updated incrementally from stack to stack.

    Args:
        in_features: ``H_in`` (width of the ``A`` rows).
        out_features: ``H_out`` (width of the ``B^T`` rows).

    Attributes:
        rows_copied: Adapter rows written into the buffers so far (new rows, moved rows and
            rows re-copied after an in-place change), a measure of the packing work.
        bytes_copied: The same in bytes (both buffers).
        reallocations: How often the buffers were replaced by new ones.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.rows_copied = 0
        self.bytes_copied = 0
        self.reallocations = 0
        self._lock = threading.Lock()
        self._a: torch.Tensor | None = None  # [capacity, H_in]
        self._b: torch.Tensor | None = None  # [capacity, H_out]
        self._start = 0  # first live row
        self._segments: list[_Segment] = []  # live adapters, in slot order, contiguous from _start
        self._live = 0  # their rows
        self._generation = 0  # bumped at every change of the rows

    def __reduce__(self) -> tuple:
        # a copied model (copy.deepcopy, pickling) starts with empty buffers of its own
        return (PackedBuffers, (self.in_features, self.out_features))

    @property
    def generation(self) -> int:
        """Changes whenever rows move or are rewritten (a view of an older generation is stale)."""
        return self._generation

    @property
    def capacity(self) -> int:
        """Rows the buffers hold, live and free."""
        return 0 if self._a is None else int(self._a.shape[0])

    @property
    def live_rows(self) -> int:
        """Rows in use by the adapters of the last layout packed."""
        return self._live

    def clear(self) -> None:
        """Drop the buffers (the layer has no low-rank adapter left)."""
        with self._lock:
            self._reset()

    def packed(self, stack: LoraStack) -> tuple[int, PackedLora] | None:
        """The buffers for ``stack``, after copying only the rows that changed.

        Args:
            stack: The layer's current stack (its present ``A``/``B`` tensors in slot order).

        Returns:
            ``(generation, views of the arena)``, the views valid while :attr:`generation`
            is that number; ``None`` when the adapters' dtypes or devices differ (the caller
            then packs by concatenation, which promotes them).
        """
        from moa.kernels.metadata import PackedLora

        present = [(a, b) for a, b in zip(stack.lora_a, stack.lora_b, strict=True) if a is not None]
        if present:
            dtype, device = present[0][0].dtype, present[0][0].device
            if any(t.dtype != dtype or t.device != device for pair in present for t in pair):
                return None
        else:
            dtype, device = torch.float32, torch.device("cpu")
        # plain tensors: never inference tensors (a call that trains a router through frozen
        # adapters saves them for backward), and no autograd history from the weights
        with self._lock, torch.inference_mode(False), torch.no_grad():
            if self._a is not None and (self._a.dtype != dtype or self._a.device != device):
                self._reset()  # the model was cast or moved: start again
            self._update(present, dtype, device)
            total = self.live_rows
            if self._a is None:
                lora_a = torch.zeros(0, self.in_features, dtype=dtype, device=device)
                lora_b = torch.zeros(0, self.out_features, dtype=dtype, device=device)
            else:
                lora_a = self._a[self._start:self._start + total]
                lora_b = self._b[self._start:self._start + total]
            offsets = [0]
            for rank in stack.ranks:
                offsets.append(offsets[-1] + rank)
            return self._generation, PackedLora(
                lora_a=lora_a,
                lora_b=lora_b,
                rank_offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
                scales=torch.tensor(stack.scales, dtype=torch.float32, device=device),
            )

    # -- the update (under the lock) ---------------------------------------------------------

    def _update(self, present: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
                device: torch.device) -> None:
        """Make the live rows equal ``present``'s, touching as few rows as possible.

        The adapters kept from the last layout are found by identity, in order; the others
        left (their gaps are closed), the new ones are inserted (the bank appends them, so
        at the end), and a kept adapter whose weights changed in place is copied again.
        """
        keys = [(tensor_key(a), tensor_key(b)) for a, b in present]
        segments = self._segments
        if len(segments) == len(present) and all(s.matches(*present[i], keys[i]) for i, s in enumerate(segments)):
            return  # nothing changed (every call of a layout but its first)
        self._generation += 1
        if not present:
            self._reset()
            return
        matched = self._match(present)
        kept = {i for i in matched if i is not None}
        if kept:
            for index in sorted(set(range(len(segments))) - kept, reverse=True):
                self._remove(index)
        else:  # nothing to keep: the rows are simply overwritten
            self._segments, self._start, self._live = [], 0, 0
        if self._a is None:
            self._allocate(sum(int(a.shape[0]) for a, _ in present), dtype, device)
        before = 0  # rows of the adapters before ``position``, already in their final place
        for position, ((a, b), key, old) in enumerate(zip(present, keys, matched, strict=True)):
            rank = int(a.shape[0])
            if old is None:
                self._insert(position, before, rank)
            elif self._segments[position].key == key:
                before += rank
                continue  # kept, unchanged
            row = self._start + before
            self._a[row:row + rank].copy_(a)
            self._b[row:row + rank].copy_(b.t())
            self._count(rank)
            self._segments[position] = _Segment(weakref.ref(a), weakref.ref(b), key, rank)
            before += rank
        self._maybe_shrink(dtype, device)

    def _match(self, present: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[int | None]:
        """For each present adapter, the index of its segment from the last layout, or ``None``.

        Matched by the tensors' identity (and size), keeping the order (the bank never
        reorders adapters); weights changed in place still match, and are copied again.
        """
        by_identity: dict[tuple[int, int], list[int]] = {}
        for index, segment in enumerate(self._segments):
            a, b = segment.a_ref(), segment.b_ref()
            if a is not None and b is not None:  # alive: their ids cannot belong to other tensors
                by_identity.setdefault((id(a), id(b)), []).append(index)
        matched: list[int | None] = []
        last = -1
        for a, b in present:
            found = next((i for i in by_identity.get((id(a), id(b)), ())
                          if i > last and self._segments[i].rows == int(a.shape[0])), None)
            matched.append(found)
            if found is not None:
                last = found
        return matched

    def _remove(self, index: int) -> None:
        """Drop segment ``index``, closing its gap by moving the shorter side."""
        segments = self._segments
        rows = segments[index].rows
        before = sum(s.rows for s in segments[:index])
        after = self._live - before - rows
        if before <= after:  # the rows before it move towards the end (none for the first)
            self._move(self._start, self._start + rows, before)
            self._start += rows
        else:  # the rows after it move towards the start (none for the last)
            row = self._start + before
            self._move(row + rows, row, after)
        del segments[index]
        self._live -= rows

    def _insert(self, position: int, before: int, rows: int) -> None:
        """Open ``rows`` rows before segment ``position``, after ``before`` live rows (a placeholder fills them)."""
        total = self._live
        if self._start + total + rows > self.capacity:
            # no room after the live rows: they all move once, to the start (of new buffers
            # when nearly full), leaving a quarter or more of the rows free for the next
            # additions; opening room before them instead would move nearly every row at
            # every addition once the end is full
            self._compact(total + rows)
        row = self._start + before
        self._move(row, row + rows, total - before)  # nothing moves for an addition at the end
        self._segments.insert(position, _Segment(_dead, _dead, (), rows))
        self._live += rows

    def _allocate(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        capacity = max(rows * 3 // 2, rows + MIN_FREE_ROWS)
        self._a = torch.empty(capacity, self.in_features, dtype=dtype, device=device)
        self._b = torch.empty(capacity, self.out_features, dtype=dtype, device=device)
        self._start = 0
        self.reallocations += 1

    def _compact(self, needed: int) -> None:
        """Move the live rows to the start of the buffers, new ones if ``needed`` rows leave under a quarter free."""
        total = self._live
        old_a, old_b, start = self._a, self._b, self._start
        if needed * 4 > self.capacity * 3:
            self._allocate(needed, old_a.dtype, old_a.device)
            self._a[:total].copy_(old_a[start:start + total])
            self._b[:total].copy_(old_b[start:start + total])
            self._count(total)
        else:
            self._move(start, 0, total)
            self._start = 0

    def _move(self, source: int, target: int, rows: int) -> None:
        """Move ``rows`` live rows from row ``source`` to row ``target`` (ranges may overlap)."""
        if rows == 0 or source == target:
            return
        for buffer in (self._a, self._b):
            block = buffer[source:source + rows]
            if abs(source - target) < rows:
                block = block.clone()  # overlapping ranges: copy_ needs a separate source
            buffer[target:target + rows].copy_(block)
        self._count(rows)

    def _maybe_shrink(self, dtype: torch.dtype, device: torch.device) -> None:
        """Give memory back when under a quarter of the rows are in use."""
        total = self._live
        if self._a is None or total * 4 >= self.capacity or self.capacity <= 4 * MIN_FREE_ROWS:
            return
        old_a, old_b, start = self._a, self._b, self._start
        self._allocate(total, dtype, device)
        self._a[:total].copy_(old_a[start:start + total])
        self._b[:total].copy_(old_b[start:start + total])
        self._count(total)

    def _reset(self) -> None:
        """:meth:`clear`, the lock held."""
        if self._a is not None or self._segments:
            self._a = self._b = None
            self._segments, self._start, self._live = [], 0, 0
            self._generation += 1

    def _count(self, rows: int) -> None:
        self.rows_copied += rows
        self.bytes_copied += rows * (self.in_features + self.out_features) * (
            self._a.element_size() if self._a is not None else 0)


__all__ = ["MIN_FREE_ROWS", "PackedBuffers", "tensor_key"]
