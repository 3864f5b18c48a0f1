"""Per-forward kernel metadata and per-layer low-rank stacks.

:class:`RoutingMetadata` is built ONCE per forward from the routing decision and shared
by every :class:`~moa.model.MixtureLinear` of the model: the (token, slot) pairs that
use an adapter, grouped by adapter (a stable sort, so tokens keep their order inside a
group), with per-adapter offsets. This is the grouping Punica's SGMV and S-LoRA use,
extended with a weight per pair so a token may mix k adapters.

:class:`LoraStack` is one layer's view of the low-rank adapters, indexed by slot: the
``A``/``B`` tensors of each adapter (``None`` where the adapter does not touch this
layer), its scale and rank. Ranks differ freely between adapters; nothing is padded.
Backends that need contiguous buffers (Triton, the dense torch path) get them from
:meth:`LoraStack.packed`: built once per stack version, and, for a stack given its layer's
:class:`~moa.kernels.packed_buffers.PackedBuffers`, updated from the previous layout's
buffers by copying only the rows of the adapters that came, went or changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from moa.kernels.packed_buffers import PackedBuffers


@dataclass
class RoutingMetadata:
    """Tokens grouped by adapter, built once per forward.

    With ``P`` = number of (token, slot) pairs whose adapter id is not -1 and weight not 0:

    Attributes:
        num_tokens: ``T``, rows of the flattened activations.
        num_adapters: ``N``, the number of adapter slots in the model.
        token_index: ``[P]`` int64, token of each pair, grouped by adapter.
        pair_adapter: ``[P]`` int32, adapter slot of each pair (non-decreasing).
        pair_weight: ``[P]`` float32, routing weight of each pair.
        adapter_offsets: ``[N + 1]`` int64, pairs of adapter ``a`` are
            ``[adapter_offsets[a], adapter_offsets[a + 1])``.
        offsets: the same offsets as a Python tuple (read once; no device sync per layer).
        active_adapters: slots with at least one pair.
        identity_adapter: a slot that covers every token exactly once, in order, with
            weight 1 (the ``set_adapter`` case), else ``None``; lets the torch path skip
            the gather and scatter.
    """

    num_tokens: int
    num_adapters: int
    token_index: torch.Tensor
    pair_adapter: torch.Tensor
    pair_weight: torch.Tensor
    adapter_offsets: torch.Tensor
    offsets: tuple[int, ...]
    active_adapters: tuple[int, ...]
    identity_adapter: int | None = None
    _extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_pairs(self) -> int:
        """``P``: (token, adapter) pairs to compute."""
        return self.offsets[-1] if self.offsets else 0

    def pairs_of(self, slot: int) -> tuple[int, int]:
        """``(start, end)`` of the pairs of adapter ``slot``."""
        return self.offsets[slot], self.offsets[slot + 1]

    def extra(self, key: str, build: Callable[[], Any]) -> Any:
        """A backend-specific value computed once per forward and shared by all layers."""
        if key not in self._extras:
            self._extras[key] = build()
        return self._extras[key]


def build_metadata(ids: torch.Tensor, weights: torch.Tensor, num_adapters: int) -> RoutingMetadata:
    """Group the (token, slot) pairs of a token-level decision by adapter.

    Args:
        ids: ``[T, k]`` int, adapter slot per token and choice, -1 = none.
        weights: ``[T, k]`` float, weight per token and choice.
        num_adapters: ``N``, number of adapter slots (ids must be < N).

    Returns:
        The metadata shared by every layer for this forward.
    """
    num_tokens, k = ids.shape
    device = ids.device
    flat_ids = ids.reshape(-1).to(torch.int64)
    flat_w = weights.reshape(-1).to(torch.float32)
    keep = (flat_ids >= 0) & (flat_w != 0)
    pair_token = torch.arange(num_tokens, device=device).repeat_interleave(k)[keep]
    pair_ids = flat_ids[keep]
    pair_w = flat_w[keep]
    order = torch.argsort(pair_ids, stable=True)
    pair_token, pair_ids, pair_w = pair_token[order], pair_ids[order], pair_w[order]
    counts = torch.bincount(pair_ids, minlength=num_adapters)
    adapter_offsets = torch.zeros(num_adapters + 1, dtype=torch.int64, device=device)
    adapter_offsets[1:] = torch.cumsum(counts, 0)
    offsets = tuple(int(o) for o in adapter_offsets.tolist())
    active = tuple(a for a in range(num_adapters) if offsets[a + 1] > offsets[a])
    identity = None
    if k == 1 and len(active) == 1 and offsets[-1] == num_tokens and bool((pair_w == 1).all()):
        # One adapter, every token once, stable order: token_index is arange(T).
        identity = active[0]
    return RoutingMetadata(
        num_tokens=num_tokens,
        num_adapters=num_adapters,
        token_index=pair_token,
        pair_adapter=pair_ids.to(torch.int32),
        pair_weight=pair_w,
        adapter_offsets=adapter_offsets,
        offsets=offsets,
        active_adapters=active,
        identity_adapter=identity,
    )


@dataclass
class PackedLora:
    """Contiguous buffers of a :class:`LoraStack`, for kernels that want one pointer.

    Attributes:
        lora_a: ``[R_total, H_in]``, the A rows of all adapters in slot order.
        lora_b: ``[R_total, H_out]``, B transposed, rows in the same order (each rank's
            output row is contiguous).
        rank_offsets: ``[N + 1]`` int32, adapter ``a`` owns rows
            ``[rank_offsets[a], rank_offsets[a + 1])`` (equal where it has no weights here).
        scales: ``[N]`` float32.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank_offsets: torch.Tensor
    scales: torch.Tensor


@dataclass
class LoraStack:
    """One layer's low-rank adapters, indexed by slot.

    Attributes:
        lora_a: per slot ``[r_a, H_in]`` or ``None`` (adapter absent from this layer).
        lora_b: per slot ``[H_out, r_a]`` or ``None``.
        scales: per slot scale (``alpha / r`` or ``alpha / sqrt(r)``), 0 where absent.
        in_features: ``H_in``.
        out_features: ``H_out``.
        buffers: The layer's packed buffers, kept across layouts (``None``: :meth:`packed`
            concatenates every adapter's weights into new buffers of this stack's own).
    """

    lora_a: list[torch.Tensor | None]
    lora_b: list[torch.Tensor | None]
    scales: list[float]
    in_features: int
    out_features: int
    buffers: PackedBuffers | None = field(default=None, repr=False)
    # (weights' version key, buffers): one value, so concurrent readers never pair the
    # buffers of one version with the key of another
    _packed: tuple[tuple, PackedLora] | None = field(default=None, repr=False)
    # A stack is a snapshot of one layer layout (rebuilt when adapters come or go), read by
    # every forward: what depends only on that layout is computed once, here, because a
    # decode step reads it in every one of the model's ~200 adapted layers.
    _ranks: tuple[int, ...] = field(init=False, repr=False)
    _present_weights: tuple[torch.Tensor, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ranks = tuple(0 if a is None else int(a.shape[0]) for a in self.lora_a)
        self._present_weights = tuple(t for t in (*self.lora_a, *self.lora_b) if t is not None)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Rank per slot (0 where absent)."""
        return self._ranks

    def weights_key(self) -> tuple:
        """Identifies the present weights' current values: their storage and version.

        In-place updates (an optimizer step) bump a tensor's version; ``param.data = ...``
        (``module.to(dtype)`` and back) swaps its storage without one. The tensors
        themselves are fixed for the stack's life, so their identity needs no place here.
        An inference tensor (a factor an adapter type computed under ``torch.inference_mode``,
        as ``moa serve`` runs) has no version counter; nothing updates such a product in
        place (a new value is a new tensor), so its storage identifies it.
        """
        return tuple([(0 if t.is_inference() else t._version, t.data_ptr())  # noqa: SLF001 - public tensor attr
                      for t in self._present_weights])

    @property
    def max_rank(self) -> int:
        """Largest rank in this layer (width of the shrink buffer)."""
        return max(self.ranks, default=0)

    def dtype(self) -> torch.dtype:
        """Dtype of the adapter weights (float32 when there are none)."""
        for a in self.lora_a:
            if a is not None:
                return a.dtype
        return torch.float32

    def seed_packed(self, key: tuple, packed: PackedLora) -> None:
        """Use ``packed`` as the buffers for weights identified by ``key`` (see :meth:`packed`)."""
        self._packed = (key, packed)

    def packed(self) -> PackedLora:
        """Contiguous buffers, rebuilt only when a weight changed (training, loading).

        With :attr:`buffers`, the layer's buffers are brought up to date (only the rows that
        differ from the last stack packed are copied) and viewed; else this stack's own are
        built by concatenation. While autograd must reach the weights, a differentiable
        concatenation is built for each call instead (never cached).
        """
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in self.lora_a
        )
        buffers = self.buffers if not needs_grad else None
        weights = self.weights_key()
        # the shared buffers may have been rewritten for another stack since: their
        # generation is part of the key
        key = weights if buffers is None else (weights, buffers.generation)
        cached = self._packed
        if cached is not None and cached[0] == key and not needs_grad:
            return cached[1]
        if buffers is not None:
            shared = buffers.packed(self)
            if shared is not None:
                generation, packed = shared
                self._packed = ((weights, generation), packed)
                return packed
        present = [(a, b) for a, b in zip(self.lora_a, self.lora_b, strict=True) if a is not None]
        dtype, device = (present[0][0].dtype, present[0][0].device) if present else (torch.float32, "cpu")
        if present:
            lora_a = torch.cat([a for a, _ in present], 0)
            lora_b = torch.cat([b.t() for _, b in present], 0).contiguous()
        else:
            lora_a = torch.zeros(0, self.in_features, dtype=dtype, device=device)
            lora_b = torch.zeros(0, self.out_features, dtype=dtype, device=device)
        offsets = [0]
        for r in self.ranks:
            offsets.append(offsets[-1] + r)
        packed = PackedLora(
            lora_a=lora_a,
            lora_b=lora_b,
            rank_offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
            scales=torch.tensor(self.scales, dtype=torch.float32, device=device),
        )
        if not needs_grad:
            self._packed = (key, packed)
        return packed
