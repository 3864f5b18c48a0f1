"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

from moa.testing import PluginInstallContract, require_plugin

require_plugin("moa-dora", "moa_dora")


class TestInstalled(PluginInstallContract):
    distribution = "moa-dora"
    entry_point = "dora"
    plugin_module = "moa_dora.plugin"
    provides = {"adapter_types": ("dora",)}
