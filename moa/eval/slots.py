"""The slot-task evaluation: does a learned per-token gate beat picking one adapter?

Run it with ``python -m moa.eval.slots --out benchmarks/results/slots`` (``--help`` lists
the knobs). It loads the NF4 default base with the shipped adapters and gate, trains a
per-token gate (:func:`moa.train.router.train_gate_lm` on a ``level="token"``
:class:`~moa.routing.LearnedGate`, base and adapters frozen) on N composite examples per
switching task plus as many replayed single-domain examples, then scores every
configuration on the slot test sets by teacher-forced exact match
(:mod:`moa.eval.teacher_forced`: greedy decoding writes the gold answer iff every answer
position's argmax is the gold token). It writes ``slots.json`` (per task and config
accuracy, paired-bootstrap intervals of the gate against the best non-oracle baseline,
the gate's agreement with segment ownership, timings), ``slots.md`` and a tokens ×
adapters heatmap of the gate's weights on a few answers (``slots_heatmap.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moa.data import DOMAINS, load_slots, load_split
from moa.data.slots import SWITCH_TASKS, TASKS, training_set
from moa.eval.teacher_forced import (
    RoutingPlan,
    explicit_rows,
    make_batch,
    oracle_switch,
    position_owners,
    routed_rows,
    teacher_forced_exact,
    teacher_forced_scores,
)
from moa.routing.decision import RoutingDecision
from moa.routing.router import Router, RoutingRequest

logger = logging.getLogger(__name__)


def replay_examples(n: int, seed: int) -> list[Any]:
    """``n`` single-domain training examples, round-robin over the domains (seeded)."""
    rng = random.Random(seed)
    pools = {d: rng.sample(load_split(d, "train"), n) for d in DOMAINS}
    return [pools[DOMAINS[i % len(DOMAINS)]][i // len(DOMAINS)] for i in range(n)]


def by_task(examples: Sequence[Any], hits: Sequence[bool]) -> dict[str, float]:
    """Accuracy per slot task."""
    out: dict[str, list[bool]] = {}
    for example, hit in zip(examples, hits, strict=True):
        out.setdefault(example.meta["task"], []).append(hit)
    return {task: sum(v) / len(v) for task, v in out.items()}


def paired_bootstrap(a: Sequence[bool], b: Sequence[bool], samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items and its 95 % percentile-bootstrap interval."""
    diff = torch.tensor([float(x) - float(y) for x, y in zip(a, b, strict=True)])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (samples, len(diff)), generator=generator)
    means = diff[idx].mean(1).sort().values
    return float(diff.mean()), float(means[int(0.025 * samples)]), float(means[int(0.975 * samples) - 1])


class DecisionRecorder(Router):
    """Wraps a token-level router and keeps each call's top-1 slot and weights per position."""

    def __init__(self, inner: Router) -> None:
        self.inner = inner
        self.name, self.level, self.hidden_layer = inner.name, inner.level, inner.hidden_layer
        self.calls: list[tuple[tuple[int, int], RoutingDecision]] = []

    def route(self, request: RoutingRequest) -> RoutingDecision:
        decision = self.inner.route(request)
        shape = tuple(request.hidden_states.shape[:2]) if request.hidden_states is not None else (0, 0)
        self.calls.append((shape, RoutingDecision(decision.ids.detach().clone(), decision.weights.detach().clone(),
                                                  decision.level)))
        return decision


def ownership_agreement(model: Any, gate: Router, examples: Sequence[Any], batch_size: int = 16) -> dict[str, Any]:
    """Share of answer positions where the gate's top-1 adapter owns the token being predicted.

    Also returns, for the first item of each task, the per-position weights (for the heatmap).
    """
    recorder = DecisionRecorder(gate)
    agree = total = 0
    samples: dict[str, dict[str, Any]] = {}
    names = list(model.adapter_names)
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        recorder.calls.clear()
        teacher_forced_exact(model, chunk, routed_rows(recorder), batch_size=batch_size)
        (rows, width), decision = recorder.calls[-1]
        batch = make_batch(model.tokenizer, chunk)
        top = decision.ids[torch.arange(decision.ids.shape[0]), decision.weights.argmax(-1)].reshape(rows, width)
        dense = torch.zeros(rows * width, len(names))
        dense.scatter_add_(1, decision.ids.clamp(min=0).long(), decision.weights * (decision.ids >= 0))
        dense = dense.reshape(rows, width, len(names))
        for r, (example, item) in enumerate(zip(chunk, batch.items, strict=True)):
            owners = position_owners(item, width)
            answer = range(item.prompt_length - 1, len(item.input_ids) - 1)
            for pos in answer:
                total += 1
                agree += int(names[int(top[r, pos])] == owners[pos])
            task = example.meta["task"]
            if task not in samples:
                tokens = [model.tokenizer.decode([t]) for t in item.input_ids[item.prompt_length:]]
                samples[task] = {"tokens": tokens, "owners": item.owners, "adapters": names,
                                 "weights": dense[r, list(answer)].tolist()}
    return {"agreement": agree / max(1, total), "positions": total, "samples": samples}


def heatmap(samples: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Tokens × adapters weights of the gate, one panel per task, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 1, figsize=(12, 2.2 * len(samples)), squeeze=False)
    for ax, (task, sample) in zip(axes[:, 0], samples.items(), strict=True):
        weights = torch.tensor(sample["weights"]).T
        ax.imshow(weights, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(sample["adapters"])), sample["adapters"], fontsize=7)
        labels = [f"{t!r}"[1:-1] + f"\n{(o or '-')[:3]}" for t, o in zip(sample["tokens"], sample["owners"], strict=True)]
        ax.set_xticks(range(len(labels)), labels, fontsize=5)
        ax.set_title(f"{task}: per-token gate weights (column = token predicted; second line = its owner)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def configurations(model: Any, sequence_gate: Router | None, token_gate: Router | None) -> dict[str, RoutingPlan]:
    """Every configuration the table compares, by name."""
    names = list(model.adapter_names)
    plans: dict[str, RoutingPlan] = {"base": explicit_rows(None)}
    plans.update({f"single:{n}": explicit_rows(n) for n in names})
    plans["uniform"] = explicit_rows({n: 1.0 / len(names) for n in names})
    plans["sum"] = explicit_rows(dict.fromkeys(names, 1.0))
    if sequence_gate is not None:
        plans["sequence_gate"] = routed_rows(sequence_gate)
    plans["oracle_switch"] = oracle_switch()
    if token_gate is not None:
        plans["token_gate"] = routed_rows(token_gate)
    return plans


def summarise(examples: Sequence[Any], results: Mapping[str, list[bool]]) -> dict[str, Any]:
    """Per task: every configuration's accuracy, and the gate against the best non-oracle baseline."""
    table = {name: by_task(examples, hits) for name, hits in results.items()}
    comparison = {}
    for task in TASKS:
        index = [i for i, e in enumerate(examples) if e.meta["task"] == task]
        baselines = {n: table[n][task] for n in table if n not in ("token_gate", "oracle_switch")}
        best = max(baselines, key=baselines.get)
        if "token_gate" in results:
            mean, low, high = paired_bootstrap([results["token_gate"][i] for i in index], [results[best][i] for i in index])
            comparison[task] = {"best_baseline": best, "best_baseline_accuracy": baselines[best],
                                "gate_minus_best": mean, "ci95": [low, high], "items": len(index)}
    return {"accuracy": table, "gate_vs_best_baseline": comparison}


def render_markdown(result: Mapping[str, Any]) -> str:
    """The accuracy table (configs × tasks) and the gate-vs-best comparison."""
    table = result["summary"]["accuracy"]
    lines = ["| config | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row.get(t, 0):.1f}" for t in TASKS) + " |")
    lines += ["", "Share of answer tokens whose argmax is the gold token (teacher-forced), %:", "",
              "| config | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for name, row in result.get("token_accuracy", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row.get(t, 0):.1f}" for t in TASKS) + " |")
    lines += ["", "| task | best non-oracle baseline | gate − best (points) | 95 % CI |", "|---|---|---|---|"]
    for task, c in result["summary"]["gate_vs_best_baseline"].items():
        lines.append(f"| {task} | {c['best_baseline']} ({100 * c['best_baseline_accuracy']:.1f}) | "
                     f"{100 * c['gate_minus_best']:+.1f} | [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train the per-token gate and score every configuration (see the module docstring)."""
    import moa
    from moa.eval.assets import load_adapters, router_dir, shipped_adapters_dir
    from moa.routing.learned_gate import LearnedGate
    from moa.train.router import train_gate_lm

    torch.manual_seed(args.seed)
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    load_adapters(model, shipped_adapters_dir())
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
    training = train_gate_lm(model, gate, examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, progress=not args.quiet)
    timings["train_gate"] = time.perf_counter() - start
    gate.metadata.update({"training": training, "composite_per_task": args.n, "replayed": len(examples) - len(composite)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gate.save(out / f"token_gate_n{args.n}_seed{args.seed}")
    results: dict[str, list[bool]] = {}
    token_accuracy: dict[str, dict[str, float]] = {}
    for name, plan in configurations(model, sequence_gate, gate).items():
        if args.only and name not in args.only:
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
                       "hidden_layer": 2, "training": training},
              "summary": summarise(test, results), "token_accuracy": token_accuracy, "ownership_agreement": agreement["agreement"],
              "agreement_positions": agreement["positions"], "seconds": {k: round(v, 1) for k, v in timings.items()},
              "predictions": {name: [int(h) for h in hits] for name, hits in results.items()},
              "test_ids": [e.id for e in test]}
    tag = f"n{args.n}_seed{args.seed}"
    (out / f"slots_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"slots_{tag}.md").write_text(render_markdown(result))
    heatmap(agreement["samples"], out / f"slots_heatmap_{tag}.png")
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m moa.eval.slots", description=__doc__.splitlines()[0])
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
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
