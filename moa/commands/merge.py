"""``moa merge``: merge adapters into one adapter, or into the base as a dense model."""

from __future__ import annotations

import argparse
from pathlib import Path

from moa.errors import MoaError


class MergeCommandError(MoaError, ValueError):
    """Bad arguments to ``moa merge``."""


def _parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise MergeCommandError(
            f"Adapter argument {text!r} is not NAME=PATH. Example: moa merge code=adapters/code "
            f"math=adapters/math --out merged"
        )
    return name, path


def cmd_merge(args: argparse.Namespace) -> int:
    """Load the base and the adapters, merge, save; print what was done."""
    import torch

    from moa.merge import merge_adapters, save_merged
    from moa.merge.strategies import BUILTIN_STRATEGIES
    from moa.model.mixture_model import MixtureModel

    adapters = [_parse_adapter(text) for text in args.adapters]
    names = [name for name, _ in adapters]
    if len(set(names)) != len(names):
        raise MergeCommandError(f"Adapter names must be distinct; got {names}.")
    if args.weights is not None and len(args.weights) != len(adapters):
        raise MergeCommandError(
            f"--weights has {len(args.weights)} values but {len(adapters)} adapters were given ({names})."
        )
    quantization = None if args.quantization == "none" else args.quantization
    model = MixtureModel.from_pretrained(args.base, quantization=quantization, max_rank=args.max_rank)
    for name, path in adapters:
        model.load_adapter(path, adapter_name=name)
    weights = args.weights if args.weights is not None else [1.0 / len(adapters)] * len(adapters)
    options = dict(rank=args.rank, density=args.density, majority_sign_method=args.majority_sign, seed=args.seed)
    if args.into_base:
        target = names[0] if len(names) == 1 and weights[0] == 1.0 else None
        if target is None:
            target = merge_adapters(model, names, weights, args.strategy, args.name, progress=True, **options)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        out = save_merged(model, args.out, dtype=dtype, adapters=target, progress=True)
        print(f"Saved the base with {dict(zip(names, weights))} merged ({args.strategy}) as a dense {args.dtype} "
              f"model to {out}; load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).")
        return 0
    merge_adapters(model, names, weights, args.strategy, args.name, progress=True, **options)
    model.save_adapter(args.name, args.out)
    config = model.peft_config[args.name]
    ranks = sorted({config.r, *config.rank_pattern.values()})
    exact = BUILTIN_STRATEGIES.get(args.strategy, (None, ""))[1]
    print(f"Merged {dict(zip(names, weights))} with {args.strategy!r} ({exact}) into adapter {args.name!r} "
          f"(rank {ranks[0] if len(ranks) == 1 else ranks}); saved in PEFT format to {Path(args.out)}.")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``merge``."""
    parser = sub.add_parser(
        "merge",
        help="merge adapters into one adapter (PEFT format) or into the base (dense model)",
        description=(
            "Merges LoRA adapters with a merge strategy (run 'moa plugins' for all): 'linear' and "
            "'cat' give the exact weighted sum of the adapters' updates, 'svd' compresses it to "
            "--rank, 'ties'/'dare_*'/'magnitude_prune' follow their papers (exact at full rank; "
            "the '_svd' variants truncate to --rank), 'linear_factors' is PEFT's 'linear' (A's and "
            "B's combined separately, not the weighted sum). The result is saved in PEFT format, "
            "or with --into-base folded into the base and saved as a dense transformers model."
        ),
        epilog="Example: moa merge code=adapters/code math=adapters/math --weights 0.6 0.4 "
        "--strategy ties --density 0.2 --out adapters/code-math",
    )
    parser.add_argument("adapters", nargs="+", metavar="NAME=PATH", help="adapters to merge (folders or Hub ids)")
    parser.add_argument("--base", default="default", help="base model: 'default', a folder or a Hub id")
    parser.add_argument(
        "--quantization", default="none", choices=["nf4", "none"],
        help="base quantization (default none: merging needs only the shapes, and --into-base should start "
        "from the dense weights)",
    )
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default: 1/n each)")
    parser.add_argument("--strategy", default="linear", help="merge strategy (default linear; see 'moa plugins')")
    parser.add_argument("--density", type=float, help="fraction kept by ties/dare/magnitude_prune, in (0, 1]")
    parser.add_argument("--majority-sign", default="total", choices=["total", "frequency"],
                        help="TIES sign election: by total mass or by count")
    parser.add_argument("--rank", type=int, help="rank of the merged adapter (default: the strategy's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random strategies (DARE)")
    parser.add_argument("--name", default="merged", help="name of the merged adapter (default merged)")
    parser.add_argument("--max-rank", type=int, default=256, help="largest adapter rank accepted")
    parser.add_argument("--into-base", action="store_true", help="fold into the base and save a dense model")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype with --into-base")
    parser.add_argument("--out", required=True, help="output folder (replaced atomically)")
    parser.set_defaults(func=cmd_merge)
