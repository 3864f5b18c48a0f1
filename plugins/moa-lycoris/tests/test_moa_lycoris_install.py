"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

from moa.testing import PluginInstallContract, require_plugin

require_plugin("moa-lycoris", "moa_lycoris")


class TestInstalled(PluginInstallContract):
    distribution = "moa-lycoris"
    entry_point = "lycoris"
    plugin_module = "moa_lycoris.plugin"
    provides = {"adapter_types": ("loha", "lokr")}
