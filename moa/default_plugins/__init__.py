"""Built-in plugins: moa's own adapter types, routers and merge strategies, registered through the public hooks.

Each module here is an ordinary plugin module, exactly like a third party's. They are
also declared as ``[project.entry-points.moa]`` of the ``moa`` distribution; the plugin
manager loads each of them once, from :data:`BUILTIN_PLUGINS`, so they are available
even when moa runs from a source tree whose entry points are not installed.
"""

from __future__ import annotations

#: ``(plugin name, module path)`` of every built-in plugin, in load order. The names are
#: the ones ``MOA_DISABLE_PLUGINS`` and ``moa plugins`` use.
BUILTIN_PLUGINS: list[tuple[str, str]] = [
    ("lora", "moa.default_plugins.lora"),
    ("routers", "moa.default_plugins.routers"),
    ("merge", "moa.default_plugins.merge"),
]

__all__ = ["BUILTIN_PLUGINS"]
