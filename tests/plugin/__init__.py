"""Tests of the plugin registry (moa.plugin, moa.default_plugins, plugins/moa-plugin-example)."""
