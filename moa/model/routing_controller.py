"""When and where a forward's routing decision is made, and how it reaches every layer.

The decision for a forward comes from one source (explicit names/weights, a router,
or ``set_adapter``) and is *pinned* for the duration of ``forward``/``generate``. A
forward pre-hook on the base turns it into :class:`~moa.kernels.RoutingMetadata` once
per forward, shared by every :class:`~moa.model.MixtureLinear`.

A router that declares ``hidden_layer = L`` decides inside the same pass: layers
``< L`` run the base alone, a pre-hook on decoder layer ``L`` hands the router the
hidden states there, and the adapters apply from layer ``L`` on. A sequence-level
decision is then kept for every later step of ``generate`` (the KV cache stays valid);
a token-level router decides again at every step, for the new tokens only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from moa.errors import RoutingError
from moa.kernels.metadata import build_metadata
from moa.routing.decision import RoutingDecision
from moa.routing.router import Router, RoutingRequest

if TYPE_CHECKING:
    from moa.model.mixture_model import MixtureModel

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (the longest ``ModuleList`` named ``layers``/``h``/``blocks``)."""
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise RoutingError("Could not find the decoder layers of this base to route on hidden states.")
    return best


@dataclass
class Pinned:
    """The routing of one ``forward``/``generate`` call.

    Attributes:
        decision: The decision, or ``None`` (base only, or a router not yet consulted).
        router: The router to consult at layer ``first_layer`` (hidden-state routers).
        attention_mask: The prompt's mask, handed to the router.
        first_layer: Adapters apply from this decoder layer on (0 = everywhere).
    """

    decision: RoutingDecision | None
    router: Router | None = None
    attention_mask: torch.Tensor | None = None
    first_layer: int = 0


class _StopForward(Exception):
    """Raised by a hook to end a partial pass once the hidden states are captured."""


class RoutingController:
    """Pins decisions, builds metadata once per forward, runs hidden-state routers."""

    def __init__(self, model: MixtureModel):
        self.model = model
        self._stack: list[Pinned] = []
        self._router_hook: Any = None
        self._base_hook = model.base_model.register_forward_pre_hook(self._on_base_forward, with_kwargs=True)

    def remove(self) -> None:
        """Detach every hook from the base (used when the base is unloaded from moa)."""
        self.router_changed(None)
        self._base_hook.remove()

    # -- pinning ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def pin(self, pinned: Pinned) -> Iterator[None]:
        """Use ``pinned`` for every base forward inside the block."""
        self._stack.append(pinned)
        try:
            yield
        finally:
            self._stack.pop()

    def router_changed(self, router: Router | None) -> None:
        """(Re)install the layer hook a hidden-state router needs."""
        if self._router_hook is not None:
            self._router_hook.remove()
            self._router_hook = None
        if router is not None and router.hidden_layer is not None:
            layers = decoder_layers(self.model.base_model)
            if not 0 <= router.hidden_layer < len(layers):
                raise RoutingError(
                    f"Router hidden_layer={router.hidden_layer} is outside this base's decoder "
                    f"layers 0..{len(layers) - 1}."
                )
            self._router_hook = layers[router.hidden_layer].register_forward_pre_hook(
                self._on_router_layer, with_kwargs=True
            )

    # -- hooks -----------------------------------------------------------------------------

    def _on_base_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the base: metadata for this forward, built once."""
        state = self.model._state
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = args[0] if args else kwargs.get("inputs_embeds")
        pinned = self._stack[-1] if self._stack else None
        state.first_layer = pinned.first_layer if pinned is not None else 0
        if tokens is None:
            state.metadata = None
            return
        batch, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
        if pinned is None:
            decision = self.model._active_decision(batch)
        elif pinned.router is not None and (pinned.decision is None or pinned.router.level == "token"):
            decision = None  # decided at layer `first_layer` by _on_router_layer
        else:
            decision = pinned.decision
        self._set_metadata(decision, batch, seq_len, tokens.device)

    def _on_router_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on decoder layer ``hidden_layer``: let the router decide from its input."""
        pinned = self._stack[-1] if self._stack else None
        if pinned is None or pinned.router is None:
            return
        if pinned.decision is not None and pinned.router.level != "token":
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        decision = self.decide(pinned.router, hidden.shape[0], hidden_states=hidden,
                               attention_mask=pinned.attention_mask)
        if pinned.router.level != "token":
            pinned.decision = decision  # reused by every later generate step
        self._set_metadata(decision, int(hidden.shape[0]), int(hidden.shape[1]), hidden.device)

    def _set_metadata(
        self, decision: RoutingDecision | None, batch: int, seq_len: int, device: torch.device
    ) -> None:
        state = self.model._state
        if decision is None or not state.enabled:
            state.metadata = None
            return
        ids, weights = decision.to(device).for_tokens(batch, seq_len)
        state.metadata = build_metadata(ids, weights, len(state.adapter_names))

    # -- asking routers --------------------------------------------------------------------

    def decide(
        self,
        router: Router,
        batch: int,
        *,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        texts: Any = None,
    ) -> RoutingDecision:
        """Ask ``router`` and check what it answers."""
        request = RoutingRequest(
            input_ids=input_ids if input_ids is not None else torch.empty(batch, 0, dtype=torch.long),
            adapter_names=self.model.adapter_names,
            attention_mask=attention_mask,
            texts=texts,
            hidden_states=hidden_states,
        )
        decision = router.route(request)
        if not isinstance(decision, RoutingDecision):
            raise RoutingError(
                f"Router {router!r} returned {type(decision).__name__}; route() must return a "
                f"moa.RoutingDecision (see RoutingDecision.from_mixtures)."
            )
        return decision

    def hidden_states_at(
        self, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The base's input to decoder layer ``layer`` (no adapters), by a partial pass."""
        captured: dict[str, torch.Tensor] = {}

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _StopForward

        handle = decoder_layers(self.model.base_model)[layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad(), self.pin(Pinned(decision=None)), contextlib.suppress(_StopForward):
                self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            handle.remove()
        return captured["hidden"]
