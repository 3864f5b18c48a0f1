"""What the plugin manager reports about each plugin, and the table ``moa plugins`` prints."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

#: Where a plugin came from.
PluginSource = Literal["builtin", "entry point", "registered"]
#: What became of it.
PluginStatus = Literal["loaded", "failed", "blocked"]

#: Kind keys of :attr:`PluginInfo.provides`, in display order, with their labels.
KIND_LABELS: dict[str, str] = {
    "adapter_types": "adapter types",
    "input_adapter_types": "input adapter types",
    "routers": "routers",
    "merge_strategies": "merge strategies",
}

_COLUMNS = ("plugin", "distribution", "version", "source", "status", "provides")


@dataclass(frozen=True)
class PluginInfo:
    """One plugin as ``moa plugins`` lists it.

    Attributes:
        name: Plugin name: the entry-point name, the built-in name or the name given to
            ``register``. ``MOA_DISABLE_PLUGINS`` takes these names.
        distribution: The installed distribution that ships it (``"moa"`` for built-ins),
            or ``None`` for plugins registered in code.
        version: That distribution's version, or ``None`` when unknown.
        source: ``"builtin"``, ``"entry point"`` or ``"registered"``.
        status: ``"loaded"``, ``"failed"`` (skipped, see ``error``) or ``"blocked"``
            (named in ``MOA_DISABLE_PLUGINS``, never imported).
        error: Why it failed (exception type and message), else ``None``.
        provides: Kind (``"adapter_types"``, ``"input_adapter_types"``, ``"routers"``, ``"merge_strategies"``) ->
            the names it registers; only kinds it provides at least one of.
    """

    name: str
    distribution: str | None
    version: str | None
    source: PluginSource
    status: PluginStatus
    error: str | None = None
    provides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def describe(self) -> str:
        """Name the plugin and where it comes from, for messages.

        Returns:
            E.g. ``"plugin 'example' (distribution moa-plugin-example 0.1.0)"``.
        """
        if self.source == "registered" and self.distribution is None:
            where = "registered in code"
        elif self.source == "builtin":
            where = f"built into {self.distribution or 'moa'} {self.version or ''}".rstrip()
        else:
            dist = self.distribution or "unknown distribution"
            where = f"distribution {dist} {self.version or ''}".rstrip()
        return f"plugin {self.name!r} ({where})"


def moa_version() -> str | None:
    """moa's version: ``moa.__version__``, else the installed metadata, else ``None``."""
    try:
        version = getattr(importlib.import_module("moa"), "__version__", None)
    except Exception:  # noqa: BLE001 - a half-written moa/__init__ must not break listing
        version = None
    if version:
        return str(version)
    try:
        return importlib.metadata.version("moa")
    except importlib.metadata.PackageNotFoundError:
        return None


def distribution_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    """``(distribution name, version)`` that declares entry point ``ep`` (``None`` s if unknown)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"] or None, dist.version or None
    except Exception:  # noqa: BLE001 - malformed METADATA: still load and name the plugin
        return None, None


def format_provides(provides: Mapping[str, Sequence[str]]) -> str:
    """Render ``{"routers": ("fixed",)}`` as ``"routers: fixed"``.

    Args:
        provides: Kind -> names, as in :attr:`PluginInfo.provides`.

    Returns:
        ``"; "``-separated groups in a fixed kind order, or ``"-"`` when empty.
    """
    order = list(KIND_LABELS) + sorted(k for k in provides if k not in KIND_LABELS)
    parts = [
        f"{KIND_LABELS.get(kind, kind)}: {', '.join(provides[kind])}"
        for kind in order
        if provides.get(kind)
    ]
    return "; ".join(parts) if parts else "-"


def render_plugins_table(infos: Sequence[PluginInfo]) -> str:
    """Render plugins as the plain-text table of ``moa plugins``.

    Columns: plugin, distribution, version, source, status, provides. A failed plugin
    gets an indented ``error:`` line under its row; a summary line ends the table.

    Args:
        infos: What :func:`moa.plugin.list_plugins` returns.

    Returns:
        The table, lines joined by ``"\\n"``, without a trailing newline.

    Example::

        >>> print(render_plugins_table(moa.list_plugins()))  # doctest: +SKIP
        plugin   distribution  version  source   status  provides
        -------  ------------  -------  -------  ------  ----------------
        lora     moa           0.1.0    builtin  loaded  adapter types: lora
        ...
    """
    if not infos:
        return "No moa plugins found. Built-ins are missing too: is moa installed correctly?"
    rows = [
        (
            info.name,
            info.distribution or "-",
            info.version or "-",
            info.source,
            info.status,
            format_provides(info.provides),
        )
        for info in infos
    ]
    widths = [max(len(col), *(len(row[i]) for row in rows)) for i, col in enumerate(_COLUMNS)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()

    lines = [line(_COLUMNS), line(["-" * w for w in widths])]
    indent = " " * (widths[0] + 2)
    for info, row in zip(infos, rows):
        lines.append(line(row))
        if info.status == "failed" and info.error:
            first, *rest = info.error.splitlines() or [""]
            lines.append(f"{indent}error: {first}")
            lines.extend(f"{indent}       {extra}" for extra in rest)
    counts = {s: sum(1 for i in infos if i.status == s) for s in ("loaded", "failed", "blocked")}
    summary = f"{counts['loaded']} loaded, {counts['failed']} failed, {counts['blocked']} blocked."
    if counts["failed"]:
        summary += " Failed plugins are skipped; set MOA_STRICT_PLUGINS=1 to make that an error."
    if counts["blocked"]:
        summary += " Blocked plugins are named in MOA_DISABLE_PLUGINS."
    lines.append(summary)
    return "\n".join(lines)


__all__ = ["KIND_LABELS", "PluginInfo", "PluginSource", "PluginStatus", "distribution_of",
           "format_provides", "moa_version", "render_plugins_table"]
