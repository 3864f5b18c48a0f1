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

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(run_demo(base=args.base, quantization=None if args.quantization == "none" else args.quantization,
                   full=args.full, retrain=args.retrain, adapters_dir=args.adapters, out_dir=args.out,
                   limit=args.limit))
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
        help="five domain adapters over the NF4 base, a learned gate, one mixed batch (the main job)",
        description=(
            "Loads the embedded default base (SmolLM2-135M-Instruct) in NF4, loads the five shipped domain "
            "adapters (sql, arithmetic, icd, french, code), trains the learned gate on the domain labels "
            "(seconds), evaluates base / oracle / gate on a quick subset of the test sets, then serves one "
            "mixed batch (one request per domain and a composite one) in ONE generate call, the gate routing "
            "each row in-pass, and prints each request, the chosen adapter weights and the answer."
        ),
    )
    demo.add_argument("--base", default="default", help="base model: 'default', a folder or a Hub id")
    demo.add_argument("--quantization", default="nf4", choices=["nf4", "none"], help="base quantization")
    demo.add_argument("--full", action="store_true",
                      help="run the full evaluation (every configuration and test item; long on a CPU)")
    demo.add_argument("--retrain", action="store_true",
                      help="train the five adapters again with the committed recipe (hours on a CPU)")
    demo.add_argument("--adapters", help="use this folder of adapters instead of the shipped ones")
    demo.add_argument("--limit", type=int, default=8, help="test items per domain in the quick evaluation")
    demo.add_argument("--out", help="where --full writes its report and --retrain its adapters (default demo_results)")
    demo.add_argument("--threads", type=int, help="torch CPU threads")
    demo.set_defaults(func=cmd_demo)

    plugins = sub.add_parser(
        "plugins",
        help="list plugins: adapter types, input adapter types, routers, merge strategies, and where each came from",
        description="Lists built-in and installed plugins (entry-point group 'moa'), with failures.",
    )
    plugins.set_defaults(func=cmd_plugins)

    base_path = sub.add_parser(
        "base-path", help="print the local folder of the default base (converting it once if needed)"
    )
    base_path.set_defaults(func=cmd_base_path)
