"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

from moa.testing import PluginInstallContract, require_plugin

require_plugin("moa-adalora", "moa_adalora")


class TestInstalled(PluginInstallContract):
    distribution = "moa-adalora"
    entry_point = "adalora"
    plugin_module = "moa_adalora.plugin"
    provides = {"adapter_types": ("adalora",)}
