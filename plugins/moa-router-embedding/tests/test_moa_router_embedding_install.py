"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

from moa.testing import PluginInstallContract, require_plugin

require_plugin("moa-router-embedding", "moa_router_embedding")


class TestInstalled(PluginInstallContract):
    distribution = "moa-router-embedding"
    entry_point = "embedding"
    plugin_module = "moa_router_embedding.plugin"
    provides = {"routers": ("embedding",)}
