"""``docs/directory.md``: the adapter and plugin directory page, generated from the registry.

The page is committed; a test fails when it differs from :func:`render_directory_page`.
Regenerate it with ``moa registry render --write`` or ``python -m moa.hub.directory``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moa.atomic import atomic_write_bytes
from moa.hub.registry import Registry, load_registry

HEADER = "<!-- Generated from registry/ by moa.hub.directory.render_directory_page(); do not edit. -->"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_directory_page(registry: Registry | None = None) -> str:
    """The Markdown of the directory page (deterministic: entries sorted by name)."""
    registry = registry or load_registry()
    lines = [
        HEADER,
        "",
        "# moa directory",
        "",
        "Curated adapters and plugins, generated from the repository's `registry/` folder. Every adapter "
        "is pinned to the sha256 of each of its files: Hub adapters at a pinned commit, adapters shipped "
        "with moa in the installed package (no download). `moa pull NAME` fetches (or copies) one and "
        "verifies it, `moa registry verify` checks every pin.",
        "",
        "## Adapters",
        "",
    ]
    if registry.adapters:
        lines += ["| name | where | pin | type | base | domains | license | metrics | description |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, a in sorted(registry.adapters.items()):
            metrics = ", ".join(f"{k} {v:.3g}" for k, v in sorted(a.metrics.items())) or "-"
            if a.source is not None:
                where, pin = f"shipped with moa: `{a.source}`", f"{len(a.files)} sha256s"
            else:
                where, pin = f"Hub: `{a.repo}`", f"commit `{(a.revision or '')[:12]}`, {len(a.files)} sha256s"
            lines.append(
                f"| `{name}` | {where} | {pin} | {a.adapter_type} | `{_cell(a.base_model)}` "
                f"({a.quantization or 'none'}) | {', '.join(a.domains)} | {a.license} | {_cell(metrics)} | "
                f"{_cell(a.description) or '-'} |"
            )
    else:
        lines.append("No adapters are registered yet. See `registry/adapters/README.md` in the repository "
                     "for the entry format.")
    lines += ["", "## Plugins", ""]
    if registry.plugins:
        lines += ["| name | pip package | provides | moa versions | entry point | description |",
                  "|---|---|---|---|---|---|"]
        for name, p in sorted(registry.plugins.items()):
            provides = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(names)}"
                                 for kind, names in sorted(p.provides.items()))
            package = f"`{p.package}` (`{p.source}`)" if p.source else f"`{p.package}`"
            lines.append(f"| `{name}` | {package} | {provides} | `{p.moa_versions}` | `{p.entry_point}` | "
                         f"{_cell(p.description)} |")
    else:
        lines.append("No plugins are registered yet.")
    lines += ["", "Install a plugin with `pip install <package>` (or `pip install ./plugins/<folder>` from this "
              "repository); `moa plugins` then lists what it provides.", ""]
    return "\n".join(lines)


def default_page_path(registry: Registry | None = None) -> Path:
    """``docs/directory.md`` beside the registry folder."""
    registry = registry or load_registry()
    return registry.root.parent / "docs" / "directory.md"


def write_directory_page(path: str | Path | None = None, registry: Registry | None = None) -> Path:
    """Write the page (atomically) and return its path."""
    registry = registry or load_registry()
    target = Path(path) if path else default_page_path(registry)
    atomic_write_bytes(target, render_directory_page(registry).encode())
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moa.hub.directory [--check] [--out PATH]``."""
    parser = argparse.ArgumentParser(description="Regenerate docs/directory.md from registry/.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is stale, write nothing")
    parser.add_argument("--out", default=None, help="where to write (default: docs/directory.md)")
    args = parser.parse_args(argv)
    registry = load_registry()
    target = Path(args.out) if args.out else default_page_path(registry)
    if args.check:
        fresh = target.is_file() and target.read_text() == render_directory_page(registry)
        print(f"{target}: {'up to date' if fresh else 'STALE; run python -m moa.hub.directory'}")  # noqa: T201
        return 0 if fresh else 1
    print(write_directory_page(target, registry))  # noqa: T201 - command-line entry
    return 0


if __name__ == "__main__":
    sys.exit(main())
