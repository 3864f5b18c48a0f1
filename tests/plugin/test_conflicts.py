"""Two plugins claiming the same name: a PluginConflictError naming both and the way out."""

from __future__ import annotations

import types

import pytest

from moa.default_plugins import BUILTIN_PLUGINS

from moa.errors import PluginConflictError
from moa.plugin import MoaPluginManager


def test_duplicate_router_name_names_both_plugins_and_distributions(
        make_dist, fresh_manager, router_source, monkeypatch):
    # a name no real installed plugin uses (moa-router-keyword provides "keyword")
    make_dist("dist-a", "1.0", {"kw_a": "kw_a_mod"}, {"kw_a_mod": router_source("kw_clash")})
    make_dist("dist-b", "2.0", {"kw_b": "kw_b_mod"}, {"kw_b_mod": router_source("kw_clash")})

    with pytest.raises(PluginConflictError) as exc:
        fresh_manager()
    message = str(exc.value)
    for part in ("router 'kw_clash'", "'kw_a'", "'kw_b'", "dist-a 1.0", "dist-b 2.0",
                 "Uninstall one of them", "MOA_DISABLE_PLUGINS="):
        assert part in message, (part, message)

    # the next step the message gives works
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", "kw_b")
    pm = fresh_manager()
    assert pm.get_router("kw_clash").__module__ == "kw_a_mod"


def test_duplicate_of_a_builtin_router_name(make_dist, router_source):
    make_dist("fixedclash", "0.5", {"clash": "clash_mod"}, {"clash_mod": router_source("fixed")})

    with pytest.raises(PluginConflictError) as exc:
        MoaPluginManager()
    message = str(exc.value)
    assert "plugin 'routers' (built into moa" in message
    assert "plugin 'clash' (distribution fixedclash 0.5)" in message


def test_same_plugin_name_from_two_distributions(make_dist, fresh_manager, router_source):
    make_dist("first-dist", "1.0", {"same": "same_one_mod"}, {"same_one_mod": router_source("r1")})
    make_dist("second-dist", "1.0", {"same": "same_two_mod"}, {"same_two_mod": router_source("r2")})

    with pytest.raises(PluginConflictError) as exc:
        fresh_manager()
    message = str(exc.value)
    assert "Two moa plugins are named 'same'" in message
    assert "first-dist" in message and "second-dist" in message
    assert "pip uninstall" in message


def test_register_under_a_taken_name(router_source):
    pm = MoaPluginManager(load_entry_points=False)
    plugin = types.ModuleType("taken_mod")
    exec(router_source("other_router"), plugin.__dict__)

    with pytest.raises(PluginConflictError, match="Two moa plugins are named 'routers'.*"
                                                   "register\\(plugin, name=...\\)"):
        pm.register(plugin, name="routers")
    with pytest.raises(PluginConflictError, match="router 'fixed'"):
        clash = types.ModuleType("clash_fixed_mod")
        exec(router_source("fixed"), clash.__dict__)
        pm.register(clash, name="clash_fixed")
    # neither attempt changed the manager
    assert pm.get_router("fixed").__module__ == "moa.routing.fixed"
    assert not pm.pluggy_manager.has_plugin("clash_fixed")
    assert [i.name for i in pm.list_plugins()] == [name for name, _ in BUILTIN_PLUGINS]


def test_two_adapter_types_for_one_peft_type():
    from moa.hookspecs import hookimpl
    from moa.plugin.records import AdapterTypeSpec

    class OtherLora:
        pass

    class OtherLoraPlugin:
        @hookimpl
        def moa_adapter_types(self):
            return [AdapterTypeSpec(name="lora2", config_class=OtherLora, layer_class=OtherLora,
                                    peft_type="lora")]

    pm = MoaPluginManager(load_entry_points=False)
    with pytest.raises(PluginConflictError) as exc:
        pm.register(OtherLoraPlugin(), name="other_lora")
    message = str(exc.value)
    assert "peft_type 'lora'" in message and "'lora2'" in message
    assert "plugin 'lora' (built into moa" in message and "'other_lora'" in message
