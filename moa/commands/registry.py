"""``moa registry``: list, verify, render and sync the curated registry of adapters and plugins."""

from __future__ import annotations

import argparse


def cmd_list(args: argparse.Namespace) -> int:
    """Print every registered adapter and plugin."""
    from moa.hub.registry import load_registry

    registry = load_registry(args.registry)
    if args.kind in ("all", "adapters"):
        print(f"adapters ({len(registry.adapters)}):")
        for name, a in sorted(registry.adapters.items()):
            print(f"  {name:<20} {a.location}  {a.adapter_type}  {', '.join(a.domains)}")
    if args.kind in ("all", "plugins"):
        print(f"plugins ({len(registry.plugins)}):")
        for name, p in sorted(registry.plugins.items()):
            provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(p.provides.items()))
            print(f"  {name:<20} pip install {p.package:<24} {provides}  (moa {p.moa_versions})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Validate every entry and check every adapter pin; exit 1 if any fails."""
    from moa.hub.registry import verify_registry

    if args.quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    results = verify_registry(args.registry, offline_ok=not args.strict, cache_dir=args.cache_dir)
    for r in results:
        print(f"{r.status:<8} {r.kind:<8} {r.name:<20} {r.message}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results)} entries: {len(results) - len(failed)} ok or skipped, {len(failed)} failed")
    return 1 if failed else 0


def cmd_render(args: argparse.Namespace) -> int:
    """Print, write or check docs/directory.md."""
    from moa.hub.directory import default_page_path, render_directory_page, write_directory_page
    from moa.hub.registry import load_registry

    registry = load_registry(args.registry)
    if args.check:
        path = default_page_path(registry)
        fresh = path.is_file() and path.read_text() == render_directory_page(registry)
        print(f"{path}: {'up to date' if fresh else 'stale; run moa registry render --write'}")
        return 0 if fresh else 1
    if args.write:
        print(write_directory_page(registry=registry))
        return 0
    print(render_directory_page(registry), end="")
    return 0


def cmd_sync_shipped(args: argparse.Namespace) -> int:
    """Write (or --check) the entries of the demo adapters shipped with moa from their manifest.json."""
    from moa.hub.registry import sync_shipped_entries

    changes = sync_shipped_entries(args.registry, write=not args.check)
    for change in changes:
        print(change)
    if args.check:
        print("shipped entries: " + ("stale; run moa registry sync-shipped" if changes else "up to date"))
        return 1 if changes else 0
    print(f"shipped entries: {len(changes)} changed" + ("; now run moa registry render --write" if changes else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``registry list | verify | render | sync-shipped``."""
    registry = sub.add_parser(
        "registry",
        help="the curated directory of adapters and plugins: list, verify, render, sync-shipped",
        description="Work with registry/ (or $MOA_REGISTRY): TOML entries validated against registry/schema/.",
    )
    registry.add_argument("--registry", default=None, help="registry folder (default: $MOA_REGISTRY or ./registry)")
    actions = registry.add_subparsers(dest="registry_command", metavar="ACTION")
    registry.set_defaults(func=lambda args: registry.print_help() or 2)

    listing = actions.add_parser("list", help="list registered adapters and plugins")
    listing.add_argument("--kind", choices=["all", "adapters", "plugins"], default="all")
    listing.set_defaults(func=cmd_list)

    verify = actions.add_parser(
        "verify", help="check every entry against its schema and every adapter pin against the Hub or cache "
                       "(shipped adapters: against the installed moa package, no network)"
    )
    verify.add_argument("--strict", action="store_true",
                        help="fail (not skip) adapters that cannot be checked because the Hub is unreachable")
    verify.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    verify.set_defaults(func=cmd_verify)

    render = actions.add_parser("render", help="print (or --write / --check) docs/directory.md")
    mode = render.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write docs/directory.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/directory.md is stale")
    render.set_defaults(func=cmd_render)

    sync = actions.add_parser(
        "sync-shipped",
        help="rewrite registry/adapters/ entries of the demo adapters from moa/demo_adapters/manifest.json",
    )
    sync.add_argument("--check", action="store_true", help="exit 1 if the entries are stale, write nothing")
    sync.set_defaults(func=cmd_sync_shipped)
