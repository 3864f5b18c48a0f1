"""MixtureLinear: a base linear layer plus a bank of adapters mixed per token."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moa.adapters.base import AdapterLayer
from moa.kernels.autograd import lora_mixture
from moa.kernels.metadata import LoraStack
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
    adapters its rows use. Adapter types that are not low rank take a per-adapter path.

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
        # (layout version, stack, generic adapters by slot), replaced as one value so a
        # thread never sees a stack of one layout with the generic slots of another
        self._cache: tuple[int, LoraStack, dict[int, AdapterLayer]] | None = None

    # -- the bank --------------------------------------------------------------------------

    def add_adapter_layer(self, name: str, layer: AdapterLayer) -> None:
        """Attach one adapter's weights (the bank bumps its ``layout_version``)."""
        self.adapters[name] = layer

    def remove_adapter_layer(self, name: str) -> AdapterLayer | None:
        """Detach and return one adapter's weights, if this layer has them."""
        if name in self.adapters:
            layer = self.adapters[name]
            del self.adapters[name]
            return layer
        return None

    def stack(self) -> LoraStack:
        """This layer's low-rank adapters by slot, rebuilt only when the layout changed."""
        return self._cached()[1]

    def _cached(self) -> tuple[int, LoraStack, dict[int, AdapterLayer]]:
        cache = self._cache
        version = self._bank.layout_version
        if cache is not None and cache[0] == version:
            return cache
        lora_a: list[torch.Tensor | None] = []
        lora_b: list[torch.Tensor | None] = []
        scales: list[float] = []
        generic: dict[int, AdapterLayer] = {}
        for slot, name in enumerate(self._bank.names):
            layer = self.adapters[name] if name in self.adapters else None
            low_rank = layer.low_rank() if layer is not None else None
            if layer is not None and low_rank is None:
                generic[slot] = layer
            a, b, scale = low_rank if low_rank is not None else (None, None, 0.0)
            lora_a.append(a)
            lora_b.append(b)
            scales.append(float(scale))
        cache = (version, LoraStack(lora_a, lora_b, scales, self.in_features, self.out_features), generic)
        self._cache = cache
        return cache

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
        _, stack, generic = self._cached()
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
        for slot in generic_active:
            start, end = meta.pairs_of(slot)
            index = meta.token_index[start:end]
            weight = meta.pair_weight[start:end]
            delta = generic[slot].delta(x2.index_select(0, index), self.base_layer)
            out2.index_add_(0, index, (delta * weight[:, None].to(delta.dtype)).to(out2.dtype))
        return out2.view(out.shape)

    def extra_repr(self) -> str:
        """The module name and its adapters, for ``print(model)``."""
        return f"module={self.module_name!r}, adapters={list(self.adapters)}"
