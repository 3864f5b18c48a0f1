"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

from moa.testing import PluginInstallContract, require_plugin

require_plugin("moa-ia3", "moa_ia3")


class TestInstalled(PluginInstallContract):
    distribution = "moa-ia3"
    entry_point = "ia3"
    plugin_module = "moa_ia3.plugin"
    provides = {"adapter_types": ("ia3",)}
