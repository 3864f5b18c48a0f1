"""Does a learned per-token gate beat picking one adapter? The slot-task comparison (issue 13).

Usage::

    .venv/bin/python benchmarks/slots_mixing.py --out benchmarks/results/slots --n 64 --seed 0
    .venv/bin/python benchmarks/slots_mixing.py --seed 1 --baselines-from benchmarks/results/slots/slots_n64_seed0.json
    .venv/bin/python benchmarks/slots_mixing.py --routing-weight 1 --baselines-from benchmarks/results/slots/slots_n64_seed0.json

It loads the NF4 default base with the shipped adapters and sequence gate, trains a per-token
gate (:func:`moa.train.router.train_gate_lm` on a ``level="token"`` LearnedGate, top-2, base
and adapters frozen) on N composite examples per switching task plus as many replayed
single-domain examples, then scores every configuration (:func:`moa.eval.slots.configurations`)
on the slot test sets by teacher-forced exact match. It writes ``slots_n<N>_seed<S>.json``
(accuracy per task and configuration, the share of correct answer tokens, paired-bootstrap
intervals of the gate against the best non-oracle baseline, the gate's agreement with segment
ownership, timings, every prediction), ``.md``, the gate itself, and a tokens × adapters heatmap
of its weights (``slots_heatmap_n<N>_seed<S>.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

from moa.data import DOMAINS, load_slots, load_split
from moa.data.slots import SWITCH_TASKS, TASKS, training_set
from moa.eval.slots import by_task, configurations, heatmap, ownership_agreement, render_markdown, summarise
from moa.eval.teacher_forced import teacher_forced_scores

logger = logging.getLogger("slots_mixing")


def replay_examples(n: int, seed: int) -> list[Any]:
    """``n`` single-domain training examples, round-robin over the domains (seeded)."""
    rng = random.Random(seed)
    pools = {d: rng.sample(load_split(d, "train"), n) for d in DOMAINS}
    return [pools[DOMAINS[i % len(DOMAINS)]][i // len(DOMAINS)] for i in range(n)]



def extra_name(folder: str) -> str:
    """An ``--extra-adapter`` folder's adapter name: its name up to ``_n`` (``composite_lora_n64_seed0``)."""
    return Path(folder).name.split("_n")[0]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the per-token gate and score every configuration (see the module docstring)."""
    import moa
    from moa.eval.assets import load_adapters, router_dir, shipped_adapters_dir
    from moa.routing.learned_gate import LearnedGate
    from moa.train.router import train_gate_lm

    torch.manual_seed(args.seed)
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    load_adapters(model, shipped_adapters_dir())
    for folder in args.extra_adapter:  # e.g. the composite LoRA of benchmarks/slots_baselines.py, as one more expert
        model.load_adapter(folder, adapter_name=extra_name(folder))
    sequence_gate = LearnedGate.load(router_dir(shipped_adapters_dir()))
    test = [e for e in load_slots("test") if e.meta["task"] in args.tasks]
    per_task: dict[str, int] = {}
    test = [e for e in test if per_task.setdefault(e.meta["task"], 0) < args.test_items
            and not per_task.__setitem__(e.meta["task"], per_task[e.meta["task"]] + 1)]
    composite = training_set(load_slots("train"), args.n)
    examples = composite + replay_examples(len(composite), args.seed)
    gate = LearnedGate(model.adapter_names, model.config.hidden_size, hidden_layer=2, level="token",
                       top_k=args.top_k, mlp_hidden=args.mlp_hidden, dropout=0.0)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # --routing-weight: the replayed single-domain examples are labelled with their domain
    labels = [None] * len(composite) + [e.domain for e in examples[len(composite):]]
    training = train_gate_lm(model, gate, examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, progress=not args.quiet,
                             routing_labels=labels if args.routing_weight > 0 else None,
                             routing_weight=args.routing_weight)
    timings["train_gate"] = time.perf_counter() - start
    gate.metadata.update({"training": training, "composite_per_task": args.n, "replayed": len(examples) - len(composite),
                          "routing_weight": args.routing_weight})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"n{args.n}_seed{args.seed}" + (f"_rw{args.routing_weight:g}" if args.routing_weight > 0 else "")
    tag += "".join(f"_plus_{extra_name(f)}" for f in args.extra_adapter)
    gate.save(out / f"token_gate_{tag}")
    results: dict[str, list[bool]] = {}
    token_accuracy: dict[str, dict[str, float]] = {}
    if args.baselines_from:  # the configurations that do not depend on this run's gate, scored before
        earlier = json.loads(Path(args.baselines_from).read_text())
        if earlier["test_ids"] != [e.id for e in test]:
            raise ValueError(f"{args.baselines_from} was scored on other test items; rerun without --baselines-from.")
        results = {k: [bool(x) for x in v] for k, v in earlier["predictions"].items() if k != "token_gate"}
        token_accuracy = {k: v for k, v in earlier["token_accuracy"].items() if k != "token_gate"}
    for name, plan in configurations(model, sequence_gate, gate).items():
        if (args.only and name not in args.only) or name in results:
            continue
        start = time.perf_counter()
        results[name], shares = teacher_forced_scores(model, test, plan, batch_size=args.batch_size * 2,
                                                      progress=not args.quiet, desc=name)
        token_accuracy[name] = by_task(test, shares)
        timings[name] = time.perf_counter() - start
        logger.info("%s: %s (%.0f s)", name, by_task(test, results[name]), timings[name])
    agreement = ownership_agreement(model, gate, [e for e in test if e.meta["task"] in SWITCH_TASKS])
    result = {"n_per_task": args.n, "seed": args.seed, "test_items_per_task": args.test_items,
              "gate": {"parameters": sum(p.numel() for p in gate.head.parameters()), "top_k": args.top_k,
                       "hidden_layer": 2, "training": training, "routing_weight": args.routing_weight},
              "summary": summarise(test, results), "token_accuracy": token_accuracy, "ownership_agreement": agreement["agreement"],
              "agreement_positions": agreement["positions"], "seconds": {k: round(v, 1) for k, v in timings.items()},
              "predictions": {name: [int(h) for h in hits] for name, hits in results.items()},
              "test_ids": [e.id for e in test]}
    (out / f"slots_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"slots_{tag}.md").write_text(render_markdown(result))
    heatmap(agreement["samples"], out / f"slots_heatmap_{tag}.png")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="benchmarks/slots_mixing.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/slots", help="folder for the JSON, Markdown and PNG")
    parser.add_argument("--n", type=int, default=64, help="composite training examples per switching task (16, 64, 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=120, help="gate training steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--top-k", type=int, default=2, help="adapters per token (<= 2 uses the weighted kernels)")
    parser.add_argument("--mlp-hidden", type=int, default=64, help="gate head width (64: ~37 k parameters)")
    parser.add_argument("--test-items", type=int, default=200, help="test items per task (the sets have 200)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--only", nargs="*", default=None, help="score only these configurations")
    parser.add_argument("--baselines-from", default=None,
                        help="an earlier slots_*.json on the same test items: reuse its gate-independent scores")
    parser.add_argument("--routing-weight", type=float, default=0.0,
                        help="weight of the routing cross-entropy that keeps the replayed single-domain examples on "
                             "their own adapter (0: LM loss only)")
    parser.add_argument("--extra-adapter", nargs="*", default=[],
                        help="more adapter folders for the gate to route (named by the folder, up to '_n')")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
