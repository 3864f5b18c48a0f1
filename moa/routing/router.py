"""The Router base class and the request it answers."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from moa.routing.decision import RoutingDecision


@dataclass
class RoutingRequest:
    """What a router sees of one batch.

    Attributes:
        input_ids: ``[B, S]`` token ids of the prompts.
        adapter_names: The model's loaded adapters, in slot order (ids index this).
        attention_mask: ``[B, S]`` or ``None``.
        texts: The prompts as text when the caller had them (``model.route``), else ``None``.
        hidden_states: ``[B, S, H]`` input of decoder layer ``router.hidden_layer``,
            computed with no adapter, for routers that declare ``hidden_layer``.
        extra: Free-form values a caller passes through to a plugin router.
    """

    input_ids: torch.Tensor
    adapter_names: Sequence[str]
    attention_mask: torch.Tensor | None = None
    texts: Sequence[str] | None = None
    hidden_states: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Router(abc.ABC):
    """Decides which adapters each request (or token) uses.

    Subclasses implement :meth:`route`. A sequence-level router (``level = "sequence"``)
    decides once per request from the prompt; the model reuses that decision for every
    generated token, so the KV cache stays valid. A token-level router returns a
    token-level :class:`RoutingDecision`.
    """

    #: Registry name (matches the plugin's ``RouterSpec.name``).
    name: ClassVar[str] = ""
    #: ``"sequence"`` (decide once per request) or ``"token"``.
    level: ClassVar[Literal["sequence", "token"]] = "sequence"
    #: ``None``: the router decides from the tokens, before the forward. ``L`` (int):
    #: it needs ``request.hidden_states``, the input of decoder layer ``L`` (0 = the token
    #: embeddings), computed with no adapter *within the same forward*: layers ``< L`` run
    #: the base alone, the router decides at layer ``L``, and the chosen adapters apply
    #: from layer ``L`` on (no second pass over the prompt, unlike X-LoRA).
    hidden_layer: int | None = None

    @abc.abstractmethod
    def route(self, request: RoutingRequest) -> RoutingDecision:
        """Return the decision for every row (or token) of ``request``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, level={self.level!r})"
