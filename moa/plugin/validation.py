"""Checks on plugins: the hooks they implement and the records those hooks return."""

from __future__ import annotations

import difflib
from typing import Any

import pluggy

from moa.errors import PluginError
from moa.plugin.records import RECORD_TYPES, AdapterTypeSpec, InputAdapterTypeSpec, MergeStrategySpec, RouterSpec

#: Hook name -> kind key (as in :attr:`PluginInfo.provides` and :meth:`MoaPluginManager.specs`).
HOOK_KINDS: dict[str, str] = {
    "moa_adapter_types": "adapter_types",
    "moa_routers": "routers",
    "moa_merge_strategies": "merge_strategies",
    "moa_input_adapter_types": "input_adapter_types",
}


def hook_suggestion(name: str) -> str:
    """``" (did you mean 'moa_routers'?)"`` for a near-miss hook name, else ``""``."""
    close = difflib.get_close_matches(name, list(HOOK_KINDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """Names of ``plugin``'s non-optional hook implementations that match no hook spec.

    Args:
        pm: The pluggy manager ``plugin`` is registered with.
        plugin: A registered plugin object.

    Returns:
        Sorted hook names, e.g. ``["moa_router"]``; empty when every hook is known.
    """
    return sorted({
        caller.name
        for caller in pm.get_hookcallers(plugin) or []
        if not caller.has_spec()
        and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls())
    })


def check_records(hook_name: str, result: Any) -> list[Any]:
    """Validate what one plugin's hook returned.

    Args:
        hook_name: A key of :data:`RECORD_TYPES`.
        result: The hook's return value.

    Returns:
        The records, as a list.

    Raises:
        PluginError: Describing the first problem (not a list, wrong record type, empty or
            duplicate name, a record field of the wrong kind).
    """
    record_type = RECORD_TYPES[hook_name]
    expected = f"a list of {record_type.__name__} (from moa.plugin.records)"
    if not isinstance(result, (list, tuple)):
        raise PluginError(f"{hook_name}() returned {type(result).__name__} {result!r:.80}; "
                          f"it must return {expected}.")
    seen: set[str] = set()
    for i, rec in enumerate(result):
        if not isinstance(rec, record_type):
            raise PluginError(f"{hook_name}() returned {type(rec).__name__} {rec!r:.80} at "
                              f"index {i}; it must return {expected}.")
        if not isinstance(rec.name, str) or not rec.name.strip() or rec.name != rec.name.strip():
            raise PluginError(f"{hook_name}() returned a record with name {rec.name!r}; names "
                              f"must be non-empty strings without surrounding spaces.")
        if rec.name in seen:
            raise PluginError(f"{hook_name}() returned the name {rec.name!r} twice.")
        seen.add(rec.name)
        problem = record_problem(rec)
        if problem:
            raise PluginError(f"{hook_name}() returned {record_type.__name__}({rec.name!r}) "
                              f"whose {problem}.")
    return list(result)


def record_problem(rec: Any) -> str | None:
    """Say what is wrong with one record's fields, or ``None`` when they look right."""
    if isinstance(rec, RouterSpec):
        from moa.routing.router import Router

        if not (isinstance(rec.router_class, type) and issubclass(rec.router_class, Router)):
            return f"router_class {rec.router_class!r} is not a moa.routing.Router subclass"
    elif isinstance(rec, AdapterTypeSpec):
        for attr in ("config_class", "layer_class"):
            if not isinstance(getattr(rec, attr), type):
                return f"{attr} {getattr(rec, attr)!r} is not a class"
        if rec.peft_type is not None and (not isinstance(rec.peft_type, str) or not rec.peft_type):
            return f"peft_type {rec.peft_type!r} is not a non-empty string or None"
    elif isinstance(rec, InputAdapterTypeSpec):
        from moa.adapters.input_level import InputAdapter, InputAdapterConfig

        for attr, base in (("config_class", InputAdapterConfig), ("adapter_class", InputAdapter)):
            value = getattr(rec, attr)
            if not (isinstance(value, type) and issubclass(value, base)):
                return f"{attr} {value!r} is not a {base.__module__}.{base.__name__} subclass"
        if rec.peft_type is not None and (not isinstance(rec.peft_type, str) or not rec.peft_type):
            return f"peft_type {rec.peft_type!r} is not a non-empty string or None"
    elif isinstance(rec, MergeStrategySpec) and not callable(rec.function):
        return f"function {rec.function!r} is not callable"
    return None


__all__ = ["HOOK_KINDS", "check_records", "hook_suggestion", "record_problem", "unknown_hooks"]
