"""moa's plugin registry: adapter types (Linear-level and input-level), routers and merge strategies.

The functions here use one process-wide :class:`MoaPluginManager`, built on first use
(built-ins first, then every ``moa`` entry point). Call :func:`reset_plugin_manager`
after installing or removing a plugin package in a running process, or in tests.

Example::

    from moa.plugin import get_router, list_plugins, render_plugins_table

    router = get_router("fixed")({"sql": 0.7, "code": 0.3})
    print(render_plugins_table(list_plugins()))
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from typing import Any

from moa.errors import PluginError
from moa.plugin.manager import (
    DISABLE_ENV,
    ENTRY_POINT_GROUP,
    HOOK_KINDS,
    STRICT_ENV,
    MoaPluginManager,
    MoaPluginWarning,
)
from moa.plugin.records import RECORD_TYPES, AdapterTypeSpec, InputAdapterTypeSpec, MergeStrategySpec, RouterSpec
from moa.plugin.report import PluginInfo, format_provides, render_plugins_table

_lock = threading.RLock()
_manager: MoaPluginManager | None = None
_building = False


def get_plugin_manager() -> MoaPluginManager:
    """The process-wide plugin manager, built (and its plugins loaded) on first call.

    Raises:
        PluginConflictError: Two installed plugins claim the same name.
        PluginError: A plugin is broken and ``MOA_STRICT_PLUGINS=1``, or a plugin looks
            up plugins while it is itself being imported.
    """
    global _manager, _building
    with _lock:
        if _manager is not None:
            return _manager
        if _building:
            raise PluginError(
                "A moa plugin looked up plugins (get_router, list_plugins, ...) while it was "
                "being imported, before the registry exists. Do such lookups inside functions, "
                "not at module level.")
        _building = True
        try:
            _manager = MoaPluginManager()
        finally:
            _building = False
        return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager; the next lookup rediscovers plugins.

    Use after ``pip install``-ing or removing a plugin package in a running process, after
    changing ``MOA_DISABLE_PLUGINS`` / ``MOA_STRICT_PLUGINS``, and in tests.
    """
    global _manager
    with _lock:
        _manager = None
        importlib.invalidate_caches()


def get_adapter_type(name: str) -> AdapterTypeSpec:
    """The adapter type registered as ``name``, e.g. ``get_adapter_type("lora")``.

    Raises:
        UnknownPluginError: Listing the registered adapter types.
    """
    return get_plugin_manager().get_adapter_type(name)


def get_input_adapter_type(name: str) -> InputAdapterTypeSpec:
    """The input-level adapter type registered as ``name``, e.g. ``get_input_adapter_type("prompt_tuning")``.

    Raises:
        UnknownPluginError: Listing the registered input adapter types.
    """
    return get_plugin_manager().get_input_adapter_type(name)


def input_adapter_type_for_peft_type(peft_type: Any) -> InputAdapterTypeSpec | None:
    """The input-level adapter type that reads ``peft_type`` (``"PROMPT_TUNING"``, any case), else ``None``."""
    return get_plugin_manager().input_adapter_type_for_peft_type(peft_type)


def adapter_type_for_peft_type(peft_type: str) -> AdapterTypeSpec:
    """The adapter type that reads ``peft_type`` (``"LORA"``, any case) of ``adapter_config.json``.

    Raises:
        UnknownPluginError: Listing the known PEFT types.
    """
    return get_plugin_manager().adapter_type_for_peft_type(peft_type)


def adapter_type_for_config(config: Mapping[str, Any]) -> AdapterTypeSpec:
    """The adapter type that reads this ``adapter_config.json`` dict.

    Adapter types whose config class defines ``accepts(config) -> bool`` are asked first
    (DoRA claims ``{"peft_type": "LORA", "use_dora": true}``); otherwise this is
    :func:`adapter_type_for_peft_type` of ``config["peft_type"]``.

    Raises:
        PluginConflictError: Two adapter types accept the same config.
        UnknownPluginError: No type accepts it and none reads its ``peft_type``.
    """
    return get_plugin_manager().adapter_type_for_config(config)


def get_router(name: str) -> type:
    """The router class registered as ``name``, e.g. ``get_router("fixed")("sql")``.

    Raises:
        UnknownPluginError: Listing the registered routers.
    """
    return get_plugin_manager().get_router(name)


def get_router_spec(name: str) -> RouterSpec:
    """The :class:`RouterSpec` registered as ``name`` (class plus description).

    Raises:
        UnknownPluginError: Listing the registered routers.
    """
    return get_plugin_manager().get_router_spec(name)


def get_merge_strategy(name: str) -> MergeStrategySpec:
    """The merge strategy registered as ``name``.

    Raises:
        UnknownPluginError: Listing the registered merge strategies.
    """
    return get_plugin_manager().get_merge_strategy(name)


def list_plugins() -> list[PluginInfo]:
    """Every plugin moa saw, loaded, failed or blocked (what ``moa plugins`` prints)."""
    return get_plugin_manager().list_plugins()


def check_pending() -> None:
    """Check that every registered hook implementation names a real moa hook.

    Raises:
        PluginError: Naming the plugin, the misspelled hook and the valid hook names.
    """
    get_plugin_manager().check_pending()


__all__ = [
    "DISABLE_ENV",
    "ENTRY_POINT_GROUP",
    "HOOK_KINDS",
    "RECORD_TYPES",
    "STRICT_ENV",
    "AdapterTypeSpec",
    "InputAdapterTypeSpec",
    "MergeStrategySpec",
    "MoaPluginManager",
    "MoaPluginWarning",
    "PluginInfo",
    "RouterSpec",
    "adapter_type_for_config",
    "adapter_type_for_peft_type",
    "check_pending",
    "format_provides",
    "get_adapter_type",
    "get_input_adapter_type",
    "get_merge_strategy",
    "get_plugin_manager",
    "get_router",
    "get_router_spec",
    "input_adapter_type_for_peft_type",
    "list_plugins",
    "render_plugins_table",
    "reset_plugin_manager",
]
