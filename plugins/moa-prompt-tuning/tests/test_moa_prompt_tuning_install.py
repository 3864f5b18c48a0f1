"""The installed package is discovered through its entry point, in this and a fresh process."""

from __future__ import annotations

from moa.testing import PluginInstallContract, require_plugin

require_plugin("moa-prompt-tuning", "moa_prompt_tuning")


class TestInstalled(PluginInstallContract):
    distribution = "moa-prompt-tuning"
    entry_point = "prompt_tuning"
    plugin_module = "moa_prompt_tuning.plugin"
    provides = {"input_adapter_types": ("prompt_tuning", "prefix_tuning")}
