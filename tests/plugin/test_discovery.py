"""Entry-point discovery from real (on-disk) distributions, and the 'blocked' path."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from moa.default_plugins import BUILTIN_PLUGINS

from moa.errors import UnknownPluginError
from moa.plugin import MoaPluginManager
from moa.routing import Router


def test_entry_point_plugin_is_discovered_with_its_distribution(
        make_dist, fresh_manager, router_source, warning_log):
    make_dist("fakeplug", "1.0", {"fake": "fakeplug_mod"},
              {"fakeplug_mod": router_source("fake_router")})

    pm = fresh_manager()

    router_cls = pm.get_router("fake_router")
    assert issubclass(router_cls, Router)
    assert router_cls.__module__ == "fakeplug_mod"
    assert pm.get_router_spec("fake_router").description == "test router"
    info = {i.name: i for i in pm.list_plugins()}["fake"]
    assert (info.distribution, info.version, info.source, info.status, info.error) == (
        "fakeplug", "1.0", "entry point", "loaded", None)
    assert dict(info.provides) == {"routers": ("fake_router",)}
    assert warning_log.plugin() == []


def test_entry_point_with_attribute_target(make_dist, fresh_manager, router_source):
    source = router_source("attr_router") + (
        "\n\nclass Holder:\n    moa_routers = staticmethod(moa_routers)\n")
    make_dist("attrplug", "0.3", {"attr": "attrplug_mod:Holder"}, {"attrplug_mod": source})

    pm = fresh_manager()

    assert pm.get_router("attr_router").__name__ == "AttrRouterRouter"


def test_disable_blocks_plugin_without_importing_it(make_dist, fresh_manager, monkeypatch,
                                                   warning_log):
    make_dist("brokenplug", "2.3", {"broken": "brokenplug_mod"},
              {"brokenplug_mod": "raise RuntimeError('must never be imported')\n"})
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", " other , broken ")

    pm = fresh_manager()

    info = {i.name: i for i in pm.list_plugins()}["broken"]
    assert (info.status, info.distribution, info.version, info.error) == (
        "blocked", "brokenplug", "2.3", None)
    assert "brokenplug_mod" not in sys.modules
    assert warning_log.plugin() == []
    assert pm.pluggy_manager.is_blocked("broken")


def test_disable_blocks_a_builtin_and_unknown_lookup_says_so(monkeypatch):
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", "routers")

    pm = MoaPluginManager(load_entry_points=False)

    info = {i.name: i for i in pm.list_plugins()}["routers"]
    assert (info.status, info.source, info.distribution) == ("blocked", "builtin", "moa")
    with pytest.raises(UnknownPluginError) as exc:
        pm.get_router("fixed")
    assert "Blocked by MOA_DISABLE_PLUGINS: routers." in str(exc.value)


def test_disabled_argument_overrides_env_and_register_honours_it(monkeypatch, router_source):
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", "routers")
    pm = MoaPluginManager(load_entry_points=False, disabled=["mine"])

    assert pm.get_router("fixed").__name__ == "FixedRouter"  # env ignored: argument wins
    plugin = types.ModuleType("mine_mod")
    exec(router_source("mine_router"), plugin.__dict__)
    assert pm.register(plugin, name="mine") is None
    assert {i.name: i.status for i in pm.list_plugins()}["mine"] == "blocked"
    with pytest.raises(UnknownPluginError):
        pm.get_router("mine_router")


def test_unmatched_disable_name_is_logged(monkeypatch, caplog):
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", "no_such_plugin")
    with caplog.at_level(logging.WARNING, logger="moa.plugin.manager"):
        MoaPluginManager(load_entry_points=False)
    known = "Known plugins: " + ", ".join(sorted(name for name, _ in BUILTIN_PLUGINS))
    assert any("no_such_plugin" in r.getMessage() and known in r.getMessage() for r in caplog.records)
