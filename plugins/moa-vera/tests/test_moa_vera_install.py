"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

from moa.testing import PluginInstallContract, require_plugin

require_plugin("moa-vera", "moa_vera")


class TestInstalled(PluginInstallContract):
    distribution = "moa-vera"
    entry_point = "vera"
    plugin_module = "moa_vera.plugin"
    provides = {"adapter_types": ("vera",)}
