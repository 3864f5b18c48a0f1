"""MixtureLinear: a base linear layer plus a bank of adapters mixed per token."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moa.adapters.base import AdapterLayer, GroupedRows
from moa.errors import AdapterShapeError
from moa.kernels.autograd import lora_mixture
from moa.kernels.metadata import LoraStack, RoutingMetadata
from moa.kernels.packed_buffers import PackedBuffers
from moa.model.call_routing import current_frame
from moa.model.targets import linear_features

if TYPE_CHECKING:
    from moa.model.adapter_bank import AdapterBank


def layer_index_of(module_name: str) -> int | None:
    """Decoder layer index in a module name (``model.layers.3.mlp.up_proj`` -> 3), if any."""
    match = re.search(r"\.(\d+)\.", f".{module_name}.")
    return int(match.group(1)) if match else None


class MixtureLinear(nn.Module):
    """``y = base(x) + sum_j w[t, j] * delta_{ids[t, j]}(x[t])`` for every token ``t``.

    The base layer (``nn.Linear`` or bitsandbytes ``Linear4bit``) is wrapped, never
    subclassed, and never dequantized here: it runs as it is, and the adapters' low-rank
    terms are added by one shrink and one expand over the whole batch, whatever mix of
    adapters its rows use. Adapter types that are not low rank take the generic path: one
    ``grouped_delta`` call per layer class that defines it, else ``delta`` per adapter.

    Args:
        base_layer: The linear layer being wrapped (kept as ``self.base_layer``).
        module_name: Its full name in the base model.
        bank: The model's :class:`~moa.model.AdapterBank` (slot order, layout version);
            the routing of each call comes from that call's frame, never from here.
    """

    def __init__(self, base_layer: nn.Module, module_name: str, bank: AdapterBank):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.in_features, self.out_features = linear_features(base_layer)
        self.adapters = nn.ModuleDict()
        self._bank = bank
        self.layer_index = layer_index_of(module_name)
        # (layout version, stack, generic adapters by slot, computed low-rank adapters by slot),
        # replaced as one value so a thread never sees a stack of one layout with the generic
        # slots of another
        self._cache: tuple[int, LoraStack, dict[int, AdapterLayer], dict[int, AdapterLayer]] | None = None
        # the kernels' packed rows of this layer's adapters, kept across layouts: a load or an
        # eviction copies the rows of the adapter that came or went, not every adapter's
        self.packed_buffers = PackedBuffers(self.in_features, self.out_features)

    # -- the bank --------------------------------------------------------------------------

    def add_adapter_layer(self, name: str, layer: AdapterLayer) -> None:
        """Attach one adapter's weights (the bank bumps its ``layout_version``)."""
        self.adapters[name] = layer

    def remove_adapter_layer(self, name: str) -> AdapterLayer | None:
        """Detach and return one adapter's weights, if this layer has them."""
        if name in self.adapters:
            layer = self.adapters[name]
            del self.adapters[name]
            if len(self.adapters) == 0:
                self.packed_buffers.clear()  # no forward will ask for them again: free them now
            return layer
        return None

    def stack(self) -> LoraStack:
        """This layer's low-rank adapters by slot, rebuilt only when the layout changed."""
        return self._current_stack(self._cached())

    def _cached(self) -> tuple[int, LoraStack, dict[int, AdapterLayer], dict[int, AdapterLayer]]:
        cache = self._cache
        version = self._bank.layout_version
        if cache is not None and cache[0] == version:
            return cache
        lora_a: list[torch.Tensor | None] = []
        lora_b: list[torch.Tensor | None] = []
        scales: list[float] = []
        generic: dict[int, AdapterLayer] = {}
        computed: dict[int, AdapterLayer] = {}
        for slot, name in enumerate(self._bank.names):
            layer = self.adapters[name] if name in self.adapters else None
            low_rank = layer.low_rank() if layer is not None else None
            if layer is not None and low_rank is None:
                generic[slot] = layer
            elif low_rank is not None and getattr(layer, "low_rank_is_computed", False):
                computed[slot] = layer
            a, b, scale = low_rank if low_rank is not None else (None, None, 0.0)
            lora_a.append(a)
            lora_b.append(b)
            scales.append(float(scale))
        stack = LoraStack(lora_a, lora_b, scales, self.in_features, self.out_features, buffers=self.packed_buffers)
        cache = (version, stack, generic, computed)
        self._cache = cache
        return cache

    def _current_stack(self, cache: tuple[int, LoraStack, dict[int, AdapterLayer], dict[int, AdapterLayer]]
                       ) -> LoraStack:
        """The cached stack, with the factors of ``low_rank_is_computed`` adapters asked for again.

        Their factors are products of parameters: while training, a new product per forward
        (in this forward's autograd graph); otherwise the same tensors until a parameter
        changes, so the stack (and its packed buffers) is reused.
        """
        version, stack, generic, computed = cache
        if not computed:
            return stack
        fresh = {slot: layer.low_rank() for slot, layer in computed.items()}
        if all(a is stack.lora_a[s] and b is stack.lora_b[s] and float(scale) == stack.scales[s]
               for s, (a, b, scale) in fresh.items()):
            return stack
        lora_a, lora_b, scales = list(stack.lora_a), list(stack.lora_b), list(stack.scales)
        for slot, (a, b, scale) in fresh.items():
            lora_a[slot], lora_b[slot], scales[slot] = a, b, float(scale)
        stack = LoraStack(lora_a, lora_b, scales, self.in_features, self.out_features, buffers=self.packed_buffers)
        if self._cache is cache:  # unless the layout changed meanwhile: keep it for the next forward
            self._cache = (version, stack, generic, computed)
        return stack

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output plus each row's routed adapter updates (the current call's routing)."""
        out = self.base_layer(x, *args, **kwargs)
        if len(self.adapters) == 0:
            return out
        frame = current_frame(self._bank)
        meta = frame.metadata_for(self.layer_index) if frame is not None else None
        if meta is None or meta.num_pairs == 0:
            return out
        cache = self._cached()
        stack, generic = self._current_stack(cache), cache[2]
        low_rank_active = [s for s in meta.active_adapters if stack.lora_a[s] is not None]
        generic_active = [s for s in meta.active_adapters if s in generic]
        if not low_rank_active and not generic_active:
            return out
        x2 = x.reshape(-1, self.in_features)
        out2 = out.reshape(-1, self.out_features)
        if meta.num_tokens != x2.shape[0]:
            raise RuntimeError(
                f"{self.module_name}: routing metadata is for {meta.num_tokens} tokens but this "
                f"layer got {x2.shape[0]}; the model's forward pre-hook was bypassed."
            )
        if torch.is_grad_enabled():
            out2 = out2.clone()  # autograd may need the base output as it was
        if low_rank_active:
            xs = x2.to(stack.dtype())
            if self.training:
                p = max(self.adapters[frame.adapter_names[s]].dropout_p() for s in low_rank_active)
                xs = F.dropout(xs, p=p, training=True) if p > 0 else xs
            # one shrink + one expand for the whole batch (explicit backward when training)
            out2 = lora_mixture(xs, stack, meta, out2, backend=frame.backend)
        if generic_active:
            self._add_generic(x2, out2, meta, [(slot, generic[slot]) for slot in generic_active])
        return out2.view(out.shape)

    def _add_generic(self, x2: torch.Tensor, out2: torch.Tensor, meta: RoutingMetadata,
                     active: list[tuple[int, AdapterLayer]]) -> None:
        """Add the generic adapters' updates to ``out2`` in place, each pair times its routing weight.

        The adapters of a class that defines ``grouped_delta`` go in one call per class (if it
        does not decline with ``None``); every other adapter in one ``delta`` call of its own.
        """
        by_class: dict[type, list[tuple[int, AdapterLayer]]] = {}
        for slot, layer in active:
            if has_grouped_delta(type(layer)):
                by_class.setdefault(type(layer), []).append((slot, layer))
        declined: set[int] = set()
        for cls, members in by_class.items():
            index, weight, offsets = self._pairs_of(meta, [slot for slot, _ in members])
            rows = GroupedRows(tuple(layer for _, layer in members), index, offsets)
            delta = cls.grouped_delta(x2, rows, self.base_layer)
            if delta is None:
                declined.update(slot for slot, _ in members)
                continue
            if tuple(delta.shape) != (rows.num_pairs, self.out_features):
                raise AdapterShapeError(
                    f"{self.module_name}: {cls.__name__}.grouped_delta returned shape {tuple(delta.shape)} for "
                    f"{rows.num_pairs} routed pairs; it must return ({rows.num_pairs}, {self.out_features}), one "
                    f"row per pair, or None to use delta() per adapter.")
            out2.index_add_(0, index, (delta * weight[:, None].to(delta.dtype)).to(out2.dtype))
        for slot, layer in active:
            if type(layer) in by_class and slot not in declined:
                continue
            start, end = meta.pairs_of(slot)
            index = meta.token_index[start:end]
            weight = meta.pair_weight[start:end]
            delta = layer.delta(x2.index_select(0, index), self.base_layer)
            out2.index_add_(0, index, (delta * weight[:, None].to(delta.dtype)).to(out2.dtype))

    @staticmethod
    def _pairs_of(meta: RoutingMetadata, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """``(token_index, pair_weight, offsets)`` of the pairs of ``slots`` (ascending), grouped by slot.

        Adjacent slots' pairs are adjacent in ``meta``, so the usual case is one slice.
        """
        spans: list[list[int]] = []
        offsets = [0]
        for slot in slots:
            start, end = meta.pairs_of(slot)
            offsets.append(offsets[-1] + end - start)
            if spans and spans[-1][1] == start:
                spans[-1][1] = end
            else:
                spans.append([start, end])
        if len(spans) == 1:
            start, end = spans[0]
            return meta.token_index[start:end], meta.pair_weight[start:end], tuple(offsets)
        index = torch.cat([meta.token_index[start:end] for start, end in spans])
        weight = torch.cat([meta.pair_weight[start:end] for start, end in spans])
        return index, weight, tuple(offsets)

    def extra_repr(self) -> str:
        """The module name and its adapters, for ``print(model)``."""
        return f"module={self.module_name!r}, adapters={list(self.adapters)}"


_DEFAULT_GROUPED_DELTA = AdapterLayer.grouped_delta.__func__


def has_grouped_delta(layer_class: type) -> bool:
    """Whether ``layer_class`` overrides :meth:`AdapterLayer.grouped_delta` (moa then calls it)."""
    method = getattr(layer_class, "grouped_delta", None)
    return method is not None and getattr(method, "__func__", method) is not _DEFAULT_GROUPED_DELTA
