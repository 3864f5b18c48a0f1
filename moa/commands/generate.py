"""``moa generate``: answer prompts with an adapter, an explicit mixture, or the learned gate."""

from __future__ import annotations

import argparse
from pathlib import Path

from moa.errors import RoutingError


def parse_weights(text: str) -> dict[str, float]:
    """``"sql=0.7,code=0.3"`` -> ``{"sql": 0.7, "code": 0.3}``."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise RoutingError(f"--weights entry {part!r} must look like NAME=WEIGHT, e.g. --weights sql=0.7,code=0.3.")
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate answers for every prompt in ONE batched generate call."""
    import torch

    import moa
    from moa.eval.assets import load_adapters, router_dir, shipped_adapters_dir
    from moa.eval.runner import generate_answers, generate_routed
    from moa.routing.learned_gate import LearnedGate

    if args.threads:
        torch.set_num_threads(args.threads)
    if sum(x is not None for x in (args.adapter, args.weights, args.router)) > 1:
        raise RoutingError("Give at most one of --adapter, --weights, --router.")
    adapters_dir = Path(args.adapters) if args.adapters else shipped_adapters_dir()
    model = moa.MixtureModel.from_pretrained(args.base, quantization=None if args.quantization == "none" else "nf4")
    load_adapters(model, adapters_dir)
    routing: list = []
    if args.adapter is not None:
        routes = [None if args.adapter in ("base", "none") else {args.adapter: 1.0}] * len(args.prompts)
    elif args.weights is not None:
        routes = [parse_weights(args.weights)] * len(args.prompts)
    else:
        gate = LearnedGate.load(args.router or router_dir(adapters_dir))
        answers, routing = generate_routed(model, args.prompts, gate, args.max_new_tokens,
                                           batch_size=len(args.prompts), progress=False)
    if not routing:
        answers = generate_answers(model, args.prompts, routes, args.max_new_tokens,
                                   batch_size=len(args.prompts), progress=False)
        routing = routes
    for i, (prompt, answer) in enumerate(zip(args.prompts, answers, strict=True)):
        route = routing[i]
        shown = "base" if not route else ", ".join(f"{n}={w:.2f}" for n, w in sorted(route.items(), key=lambda x: -x[1]))
        print(f"[{i}] {prompt}\n    adapters: {shown}\n    answer:   {answer}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``generate``."""
    p = sub.add_parser(
        "generate",
        help="answer prompts (one batched generate call) with an adapter, a mixture, or the learned gate",
        description="Without --adapter/--weights, the learned gate routes each prompt (in-pass, per request).",
    )
    p.add_argument("prompts", nargs="+", help="user messages (the chat template is applied)")
    p.add_argument("--adapter", help="one adapter for every prompt ('base' = no adapter)")
    p.add_argument("--weights", help="a mixture for every prompt, e.g. sql=0.7,code=0.3")
    p.add_argument("--router", help="learned-gate folder (default: <adapters>/router)")
    p.add_argument("--adapters", help="folder of adapter folders (default: the shipped ones)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--base", default="default")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_generate)
