"""The records plugins return from their hooks: small, frozen, typed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AdapterTypeSpec:
    """An adapter type (LoRA, IA3, DoRA...) a plugin provides.

    Attributes:
        name: Registry name, e.g. ``"lora"``; what ``moa.get_adapter_type`` looks up.
        config_class: A :class:`moa.adapters.AdapterConfig` subclass.
        layer_class: A :class:`moa.adapters.AdapterLayer` subclass built once per target module.
        peft_type: The ``peft_type`` value in ``adapter_config.json`` this type reads and
            writes (``"LORA"``), so PEFT folders are routed to the right type.
        description: One line for ``moa plugins``.
    """

    name: str
    config_class: type
    layer_class: type
    peft_type: str | None = None
    description: str = ""


@dataclass(frozen=True)
class RouterSpec:
    """A router a plugin provides.

    Attributes:
        name: Registry name, e.g. ``"learned_gate"``.
        router_class: A :class:`moa.routing.Router` subclass.
        description: One line for ``moa plugins``.
    """

    name: str
    router_class: type
    description: str = ""


@dataclass(frozen=True)
class MergeStrategySpec:
    """A merge strategy a plugin provides.

    Attributes:
        name: Registry name, e.g. ``"ties"``.
        function: Pure tensor function; its signature is documented in ``moa.merge``.
        description: One line for ``moa plugins``.
    """

    name: str
    function: Callable[..., Any]
    description: str = ""


#: Hook name -> the record type each of its results must be.
RECORD_TYPES: dict[str, type] = {
    "moa_adapter_types": AdapterTypeSpec,
    "moa_routers": RouterSpec,
    "moa_merge_strategies": MergeStrategySpec,
}
