"""Each of the three hooks, end to end, plus lookups and their error messages."""

from __future__ import annotations

import types

import pytest

from moa.errors import PluginError, UnknownPluginError
from moa.hookspecs import hookimpl
from moa.plugin import MoaPluginManager
from moa.plugin.records import AdapterTypeSpec, MergeStrategySpec, RouterSpec
from moa.routing import FixedRouter


def _bare_manager() -> MoaPluginManager:
    return MoaPluginManager(load_builtins=False, load_entry_points=False)


class _Config:
    pass


class _Layer:
    pass


def _mean(tensors, weights):
    return sum(w * t for t, w in zip(tensors, weights)) / sum(weights)


class MultiPlugin:
    """One plugin implementing all three hooks (as an object: methods are hookimpls too)."""

    @hookimpl
    def moa_adapter_types(self):
        return [AdapterTypeSpec(name="ia3_test", config_class=_Config, layer_class=_Layer,
                                peft_type="IA3", description="test adapter type")]

    @hookimpl
    def moa_routers(self):
        return [RouterSpec(name="embedding", router_class=FixedRouter),
                RouterSpec(name="keyword", router_class=FixedRouter),
                RouterSpec(name="learned_gate", router_class=FixedRouter)]

    @hookimpl
    def moa_merge_strategies(self):
        return [MergeStrategySpec(name="mean_test", function=_mean, description="mean")]


def test_moa_adapter_types_hook():
    pm = _bare_manager()
    assert pm.register(MultiPlugin(), name="multi") == "multi"

    spec = pm.get_adapter_type("ia3_test")
    assert (spec.config_class, spec.layer_class, spec.peft_type) == (_Config, _Layer, "IA3")
    assert pm.adapter_type_for_peft_type("ia3") is spec  # case-insensitive
    assert pm.adapter_type_for_peft_type("IA3") is spec
    info = pm.list_plugins()[0]
    assert (info.name, info.source, info.distribution, info.version) == (
        "multi", "registered", None, None)
    assert dict(info.provides) == {"adapter_types": ("ia3_test",),
                                   "routers": ("embedding", "keyword", "learned_gate"),
                                   "merge_strategies": ("mean_test",)}


def test_moa_routers_hook_and_exact_unknown_message():
    pm = _bare_manager()
    pm.register(MultiPlugin(), name="multi")

    assert pm.get_router("keyword") is FixedRouter
    assert pm.get_router_spec("keyword").name == "keyword"
    with pytest.raises(UnknownPluginError) as exc:
        pm.get_router("kw")
    assert str(exc.value) == ("Unknown router 'kw'. Registered: embedding, keyword, "
                              "learned_gate. Is its plugin installed? Run 'moa plugins'.")
    assert isinstance(exc.value, KeyError)  # callers catching KeyError keep working
    with pytest.raises(UnknownPluginError, match="Did you mean 'keyword'"):
        pm.get_router("keywords")


def test_moa_merge_strategies_hook():
    pm = _bare_manager()
    pm.register(MultiPlugin(), name="multi")

    spec = pm.get_merge_strategy("mean_test")
    assert spec.function([1.0, 3.0], [1.0, 1.0]) == 2.0
    with pytest.raises(UnknownPluginError) as exc:
        pm.get_merge_strategy("ties")
    assert str(exc.value).startswith("Unknown merge strategy 'ties'. Registered: mean_test.")


def test_unknown_adapter_type_and_peft_type_messages():
    pm = _bare_manager()
    pm.register(MultiPlugin(), name="multi")

    with pytest.raises(UnknownPluginError) as exc:
        pm.get_adapter_type("dora")
    assert str(exc.value).startswith("Unknown adapter type 'dora'. Registered: ia3_test.")
    with pytest.raises(UnknownPluginError) as exc:
        pm.adapter_type_for_peft_type("DORA")
    message = str(exc.value)
    assert "'DORA'" in message and "Known PEFT types: IA3 (ia3_test)" in message
    assert "DoRA" in message and "plugins" in message
    with pytest.raises(UnknownPluginError, match="Unknown plugin kind 'tokenizers'"):
        pm.specs("tokenizers")


def test_registered_broken_plugin_raises_and_leaves_manager_unchanged():
    pm = _bare_manager()
    broken = types.ModuleType("broken_registered")

    @hookimpl
    def moa_routers():
        raise ValueError("nope")

    broken.moa_routers = moa_routers
    with pytest.raises(PluginError, match="registered in code.*raised in its hook "
                                          "moa_routers\\(\\): ValueError: nope"):
        pm.register(broken)
    assert pm.list_plugins() == []
    assert not pm.pluggy_manager.has_plugin("broken_registered")


def test_unregister_removes_records():
    pm = _bare_manager()
    pm.register(MultiPlugin(), name="multi")
    pm.unregister("multi")
    assert pm.list_plugins() == []
    assert pm.specs("routers") == {}
    with pytest.raises(UnknownPluginError, match="Unknown plugin 'multi'"):
        pm.unregister("multi")
    pm.register(MultiPlugin(), name="multi")  # the names are free again
    assert pm.get_router("keyword") is FixedRouter
