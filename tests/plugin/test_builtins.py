"""Built-ins register through the same hooks, exactly once, with or without moa's entry points."""

from __future__ import annotations

import pytest

from moa.default_plugins import BUILTIN_PLUGINS
from moa.errors import UnknownPluginError
from moa.plugin import (
    MoaPluginManager,
    adapter_type_for_peft_type,
    check_pending,
    get_adapter_type,
    get_merge_strategy,
    get_plugin_manager,
    get_router,
    get_router_spec,
    list_plugins,
    reset_plugin_manager,
)


def _builtin_infos(pm: MoaPluginManager):
    return [i for i in pm.list_plugins() if i.name in dict(BUILTIN_PLUGINS)]


def test_builtins_listed_once_from_source_tree(warning_log):
    pm = MoaPluginManager()

    infos = _builtin_infos(pm)
    assert sorted(i.name for i in infos) == sorted(name for name, _ in BUILTIN_PLUGINS)
    assert {"lora", "merge", "routers"} <= {i.name for i in infos}
    assert {(i.source, i.distribution, i.status) for i in infos} == {("builtin", "moa", "loaded")}
    assert warning_log.plugin() == []


def test_builtins_listed_once_when_moa_entry_points_are_installed(make_dist, warning_log):
    # an installed moa declares the very same modules as entry points (see pyproject.toml)
    make_dist("moa", "0.1.0", dict(BUILTIN_PLUGINS))

    pm = MoaPluginManager()

    names = [i.name for i in pm.list_plugins()]
    assert names.count("lora") == 1 and names.count("routers") == 1
    assert {i.source for i in _builtin_infos(pm)} == {"builtin"}
    assert pm.get_router("fixed").__name__ == "FixedRouter"
    assert warning_log.plugin() == []


def test_builtin_routers_plugin_provides_fixed():
    from moa.routing.fixed import FixedRouter

    pm = MoaPluginManager(load_entry_points=False)
    assert pm.get_router("fixed") is FixedRouter
    assert pm.get_router_spec("fixed").description
    info = {i.name: i for i in pm.list_plugins()}["routers"]
    assert "fixed" in info.provides["routers"]


def test_builtin_lora_adapter_type():
    from moa.adapters.lora import LoraConfig, LoraLayer

    pm = MoaPluginManager(load_entry_points=False)
    spec = pm.get_adapter_type("lora")
    assert (spec.config_class, spec.layer_class, spec.peft_type) == (LoraConfig, LoraLayer, "LORA")
    assert pm.adapter_type_for_peft_type("lora") is spec
    assert pm.adapter_type_for_peft_type("LORA") is spec


def test_module_level_functions_share_one_lazily_built_manager(monkeypatch):
    pm = get_plugin_manager()
    assert get_plugin_manager() is pm
    assert get_router("fixed").__name__ == "FixedRouter"
    assert get_router_spec("fixed").name == "fixed"
    assert get_adapter_type("lora").peft_type == "LORA"
    assert adapter_type_for_peft_type("Lora").name == "lora"
    assert {"lora", "routers"} <= {i.name for i in list_plugins()}
    assert get_merge_strategy("ties").name == "ties"
    with pytest.raises(UnknownPluginError, match="Unknown merge strategy 'no_such_strategy'"):
        get_merge_strategy("no_such_strategy")
    check_pending()

    # settings are read when the manager is built: reset picks up a change
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", "routers")
    assert get_router("fixed")  # still the old manager
    reset_plugin_manager()
    assert get_plugin_manager() is not pm
    with pytest.raises(UnknownPluginError, match="Blocked by MOA_DISABLE_PLUGINS: routers"):
        get_router("fixed")
