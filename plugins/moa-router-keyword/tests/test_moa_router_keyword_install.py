"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

from moa.testing import PluginInstallContract, require_plugin

require_plugin("moa-router-keyword", "moa_router_keyword")


class TestInstalled(PluginInstallContract):
    distribution = "moa-router-keyword"
    entry_point = "keyword"
    plugin_module = "moa_router_keyword.plugin"
    provides = {"routers": ("keyword",)}
