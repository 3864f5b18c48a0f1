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
class InputAdapterTypeSpec:
    """An input-level adapter type (prompt tuning, prefix tuning...) a plugin provides.

    Input-level adapters put something before a row's tokens (virtual token embeddings, or
    per-layer prefix keys and values) instead of changing a Linear layer; see
    :mod:`moa.adapters.input_level`.

    Attributes:
        name: Registry name, e.g. ``"prompt_tuning"``; what ``moa.plugin.get_input_adapter_type`` looks up.
        config_class: A :class:`moa.adapters.input_level.InputAdapterConfig` subclass.
        adapter_class: A :class:`moa.adapters.input_level.InputAdapter` subclass, built once per adapter.
        peft_type: The ``peft_type`` in ``adapter_config.json`` this type reads and writes
            (``"PROMPT_TUNING"``), unique across adapter types of both kinds.
        description: One line for ``moa plugins``.
    """

    name: str
    config_class: type
    adapter_class: type
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
    "moa_input_adapter_types": InputAdapterTypeSpec,
}
