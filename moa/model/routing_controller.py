"""Where a call's routing decision is made and how it reaches every layer.

A model call (``forward``, ``generate``, ``route``) runs the base inside a
:class:`~moa.model.call_routing.CallFrame` held in a context variable (see
:mod:`moa.model.call_routing`). Hooks installed ONCE when the model is built read that
frame: a forward pre-hook on the base turns the call's decision into
:class:`~moa.kernels.RoutingMetadata` once per forward (and picks the kernel backend
once), shared by every :class:`~moa.model.MixtureLinear`; a pre-hook on each decoder
layer lets a router that declares ``hidden_layer = L`` decide the routed rows inside the
same pass (layers ``< L`` run those rows on the base, their adapters apply from ``L`` on;
rows with an explicit decision use their adapters everywhere). The hooks keep no state of
their own, so any number of calls may run at once from different threads.

A sequence-level decision is made once per call (the prompt) and reused for every later
step of ``generate`` (the KV cache stays valid); a token-level router decides again at
every step, for the new tokens only.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moa import kernels
from moa.errors import RoutingError
from moa.kernels.metadata import RoutingMetadata, build_metadata
from moa.model.adapter_bank import AdapterBank
from moa.model.call_routing import CallFrame, CallPlan, calling, combine, current_frame, enter, expand_rows, leave
from moa.routing.decision import RoutingDecision
from moa.routing.router import Router, RoutingRequest


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


class _StopForward(Exception):
    """Raised by a hook to end a partial pass once the hidden states are captured."""


def ask_router(
    router: Router,
    adapter_names: tuple[str, ...] | list[str],
    batch: int,
    *,
    input_ids: torch.Tensor | None = None,
    hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    texts: Any = None,
) -> RoutingDecision:
    """Ask ``router`` about ``batch`` rows and check that it answers a RoutingDecision."""
    request = RoutingRequest(
        input_ids=input_ids if input_ids is not None else torch.empty(batch, 0, dtype=torch.long),
        adapter_names=list(adapter_names),
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


class RoutingController:
    """Installs the model's routing hooks once and serves every call's frame through them.

    Args:
        bank: The model's adapters (frames are keyed by it).
        default_plan: The plan of a direct ``base_model(...)`` call made outside any moa
            call (``set_adapter``'s adapters), given the batch size.
    """

    def __init__(self, bank: AdapterBank, default_plan: Callable[[int], CallPlan]):
        self.bank = bank
        self._default_plan = default_plan
        base = bank.base_model
        self._hooks = [
            base.register_forward_pre_hook(self._on_base_forward, with_kwargs=True),
            base.register_forward_hook(self._after_base_forward, always_call=True),
        ]
        try:
            layers = decoder_layers(base)
        except RoutingError:
            layers = nn.ModuleList()
        self.num_layers = len(layers)
        for index, layer in enumerate(layers):
            hook = functools.partial(self._on_decoder_layer, index)
            self._hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        """Detach every hook from the base (when the base leaves moa)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def check_router(self, router: Router) -> None:
        """Raise :class:`RoutingError` if ``router`` reads a layer this base does not have."""
        layer = router.hidden_layer
        if layer is not None and not 0 <= layer < self.num_layers:
            raise RoutingError(
                f"Router hidden_layer={layer} is outside this base's decoder layers "
                f"0..{self.num_layers - 1}."
            )

    def hidden_states_at(
        self, layers: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs: Any
    ) -> dict[int, torch.Tensor]:
        """The base's inputs to decoder ``layers`` (no adapters), by one partial pass.

        Only the layers up to ``max(layers)`` run; ``kwargs`` go to the base (``position_ids``).
        """
        wanted = tuple(sorted({int(layer) for layer in layers}))
        bad = [layer for layer in wanted if not 0 <= layer < self.num_layers]
        if bad or not wanted:
            raise RoutingError(
                f"Layers {list(bad or layers)} are not decoder layers of this base (0..{self.num_layers - 1})."
            )
        frame = CallFrame(self.bank, CallPlan(explicit=None, enabled=False), self.bank.names, capture_layers=wanted)
        with torch.no_grad(), calling(frame), contextlib.suppress(_StopForward):
            self.bank.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        return frame.captured

    # -- hooks -----------------------------------------------------------------------------

    def _on_base_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = args[0] if args else kwargs.get("inputs_embeds")
        frame = current_frame(self.bank)
        if frame is None:  # a direct base_model(...) call: set_adapter's adapters, for this forward
            batch = int(tokens.shape[0]) if tokens is not None else 0
            frame = CallFrame(self.bank, self._default_plan(batch), self.bank.names)
            frame.scratch.update(implicit=enter(frame), depth=0)
        elif "implicit" in frame.scratch:  # a base call nested in a direct one
            frame.scratch["depth"] += 1
        frame.early = frame.late = None
        if tokens is None or not frame.plan.enabled:
            return
        batch, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
        frame.backend = kernels.backend_for(tokens.device)
        frame.scratch["input_ids"] = kwargs.get("input_ids")
        frame.scratch["attention_mask"] = kwargs.get("attention_mask")
        plan = frame.plan
        frame.early = self._metadata(frame, plan.explicit, batch, seq_len, tokens.device)
        if plan.needs_router and plan.router.hidden_layer is None:
            self._decide_routed_rows(frame, batch, seq_len, tokens.device, input_ids=frame.scratch["input_ids"])
        elif plan.late is not None and not plan.needs_router:
            frame.late = self._metadata(frame, plan.late, batch, seq_len, tokens.device)
        elif not plan.needs_router:
            frame.late = frame.early

    def _after_base_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        frame = current_frame(self.bank)
        if frame is None or "implicit" not in frame.scratch:
            return
        if frame.scratch["depth"] > 0:
            frame.scratch["depth"] -= 1
        else:
            leave(frame.scratch["implicit"])

    def _on_decoder_layer(self, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        frame = current_frame(self.bank)
        if frame is None:
            return
        if index in frame.capture_layers:
            frame.captured[index] = args[0] if args else kwargs["hidden_states"]
            if index == frame.capture_layers[-1]:
                raise _StopForward
        plan = frame.plan
        router = plan.router
        if not plan.enabled or not plan.needs_router or router.hidden_layer != index:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        batch, seq_len = int(hidden.shape[0]), int(hidden.shape[1])
        self._decide_routed_rows(frame, batch, seq_len, hidden.device, hidden_states=hidden)

    # -- deciding --------------------------------------------------------------------------

    def _decide_routed_rows(
        self,
        frame: CallFrame,
        batch: int,
        seq_len: int,
        device: torch.device,
        *,
        input_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> None:
        """Ask the router about the routed rows only; merge with the explicit rows' decision."""
        plan = frame.plan
        decided_batch = plan.explicit.ids.shape[0] if plan.explicit is not None else batch
        rows = expand_rows(plan.routed_rows, batch, decided_batch)
        index = torch.tensor(rows, dtype=torch.long, device=device)
        mask = frame.scratch.get("attention_mask")  # the base forward's own mask (beams expanded)
        if mask is not None and tuple(mask.shape) == (batch, seq_len):
            mask = mask.index_select(0, index.to(mask.device))
        else:
            mask = None  # a later generate step: the mask covers the cache, not these tokens
        decision = ask_router(
            plan.router,
            frame.adapter_names,
            len(rows),
            input_ids=input_ids.index_select(0, index) if input_ids is not None else None,
            hidden_states=hidden_states.index_select(0, index) if hidden_states is not None else None,
            attention_mask=mask,
        )
        merged = combine(plan.explicit, decision.to(device), rows, batch, seq_len)
        if plan.router.level != "token":
            plan.late = merged  # reused by every later step of this call
        frame.late = self._metadata(frame, merged, batch, seq_len, device)

    @staticmethod
    def _metadata(
        frame: CallFrame, decision: RoutingDecision | None, batch: int, seq_len: int, device: torch.device
    ) -> RoutingMetadata | None:
        if decision is None:
            return None
        ids, weights = decision.to(device).for_tokens(batch, seq_len)
        return build_metadata(ids, weights, len(frame.adapter_names))
