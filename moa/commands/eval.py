"""``moa eval``: every domain under base, each adapter, oracle, the learned gate, uniform."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate the adapters (and gate) on the test sets; write eval.json, eval.md and PNGs."""
    import torch

    import moa
    from moa.data import DOMAINS, load_composite, load_split
    from moa.eval import EvalConfig, evaluate, render_markdown, write_report
    from moa.eval.assets import load_adapters, router_dir, shipped_adapters_dir
    from moa.routing.learned_gate import LearnedGate

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters_dir = Path(args.adapters) if args.adapters else shipped_adapters_dir()
    model = moa.MixtureModel.from_pretrained(args.base, quantization=None if args.quantization == "none" else "nf4")
    names = load_adapters(model, adapters_dir)
    domains = [d for d in (args.domains.split(",") if args.domains else DOMAINS) if d in names]
    gate_dir = Path(args.router) if args.router else router_dir(adapters_dir)
    gate = LearnedGate.load(gate_dir) if (gate_dir / "router_config.json").is_file() else None
    if gate is None:
        print(f"no gate at {gate_dir}: skipping the learned gate (train one with 'moa train-router')")
    configs = tuple(args.configs.split(",")) if args.configs else EvalConfig.configs
    config = EvalConfig(limit=args.limit, matrix_limit=args.matrix_limit, batch_size=args.batch_size, configs=configs,
                        composite=not args.no_composite)
    examples = {d: load_split(d, args.split) for d in domains}
    composite = load_composite() if config.composite else []
    if args.limit and composite:
        composite = composite[: args.limit]
    from moa.data.chat import answer_token_budget

    budgets = {d: answer_token_budget(model.tokenizer, [e.answer for e in load_split(d, "train")]) for d in domains}
    result = evaluate(model, examples, [d for d in names if d in DOMAINS], gate=gate, composite=composite,
                      config=config, budgets=budgets)
    result["meta"] = {"base": args.base, "quantization": args.quantization, "adapters_dir": str(adapters_dir),
                      "router_dir": str(gate_dir) if gate else None, "split": args.split,
                      "torch_threads": torch.get_num_threads()}
    token_dir = Path(args.token_router) if args.token_router else adapters_dir / "token_router"
    if config.composite and (token_dir / "router_config.json").is_file():
        result["token_gate"] = _token_gate_part(model, LearnedGate.load(token_dir), args)
        result["meta"]["token_router_dir"] = str(token_dir)
    paths = write_report(result, args.out)
    print(render_markdown(result))
    if "token_gate" in result:
        t = result["token_gate"]
        print(f"per-token gate on {t['items']} slot-task test items (teacher-forced): exact "
              + ", ".join(f"{k} {100 * v:.1f} %" for k, v in t["exact"].items())
              + f"; top adapter = segment owner on {100 * t['ownership_agreement']:.1f} % of answer tokens; "
              f"heatmap {t['heatmap']}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _token_gate_part(model: Any, gate: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The per-token gate on the first ``--slot-items`` test items of every slot task."""
    from moa.data import load_slots
    from moa.eval.slots import token_gate_report

    per_task: dict[str, list[Any]] = {}
    for example in load_slots(args.split):
        items = per_task.setdefault(example.meta["task"], [])
        if len(items) < args.slot_items:
            items.append(example)
    return token_gate_report(model, gate, [e for items in per_task.values() for e in items], Path(args.out))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval``."""
    p = sub.add_parser(
        "eval",
        help="score base, each adapter, oracle routing, the learned gate and a uniform mixture per domain",
        description=(
            "Runs greedy generation in mixed batches (one generate call serves rows of different adapters) "
            "on every domain's test set under: the base, each adapter (the domain x adapter matrix), oracle "
            "routing, the learned gate, and a uniform mixture of all adapters; plus routing accuracy, a "
            "confusion matrix and the composite prompts. Writes eval.json, eval.md and PNG plots."
        ),
    )
    p.add_argument("--adapters", help="folder of adapter folders named by domain (default: the shipped ones)")
    p.add_argument("--router", help="learned-gate folder (default: <adapters>/router)")
    p.add_argument("--limit", type=int, help="test examples per domain (default: all)")
    p.add_argument("--matrix-limit", type=int,
                   help="run the off-diagonal matrix cells (adapter A on domain B) on only the first N "
                        "examples of each domain; the diagonal, base, gate and uniform still use all")
    p.add_argument("--split", default="test", choices=["test", "dev"])
    p.add_argument("--domains", help="comma-separated subset of domains")
    p.add_argument("--configs", help="comma-separated subset of: base,matrix,oracle,gate,uniform")
    p.add_argument("--no-composite", action="store_true",
                   help="skip the composite prompts (and the per-token gate on the slot tasks)")
    p.add_argument("--token-router",
                   help="per-token gate folder scored on the slot tasks, with a tokens x adapters heatmap PNG "
                        "(default: <adapters>/token_router when it exists)")
    p.add_argument("--slot-items", type=int, default=25, help="slot-task items per task for the per-token gate")
    p.add_argument("--batch-size", type=int, default=24, help="rows per generate call")
    p.add_argument("--base", default="default")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", default="eval_results", help="output folder")
    p.set_defaults(func=cmd_eval)
