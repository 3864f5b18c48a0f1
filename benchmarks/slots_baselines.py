"""The slot tasks' trained baselines (issue 13): a LoRA on the same N examples, and LoraHub-style weights.

Usage::

    .venv/bin/python benchmarks/slots_baselines.py --against benchmarks/results/slots/slots_n64_seed0.json

``--against`` is a ``benchmarks/slots_mixing.py`` result: its N, seed and test items are reused,
and its per-token gate's predictions are compared with these baselines item by item. On the NF4
default base with the shipped adapters:

1. **A LoRA trained on the same N composite examples per switching task** (the issue's "same
   steps budget": the gate's steps and batch size). It uses the shipped adapters' recipe (rank 8,
   layers from 2, six projections, QLoRA) through :func:`moa.train.sft.train_adapter`, Trainer
   underneath. Unlike the gate, it sees no replayed single-domain examples. It is trained on the
   composite answers only, so it can learn the hand-over tokens that no shipped adapter writes.
2. **LoraHub-style static weights** (arXiv 2307.13269): one non-negative weight per shipped
   adapter, searched without gradients by CMA-ES (the ``cma`` package, as nevergrad's default
   optimiser does for this size). The objective is the teacher-forced answer loss on the first
   ``--search-n`` training examples per task, plus 0.05 x the L1 norm of the weights (LoraHub's
   regulariser). moa mixtures take weights >= 0, so the search box is [0, 1.5], not LoraHub's
   [-1.5, 1.5].

Both are scored by teacher-forced exact match (:mod:`moa.eval.teacher_forced`) on the same test
items. The script writes ``slots_baselines_n<N>_seed<S>.json`` (accuracy per task, the share of
correct answer tokens, the gate minus each baseline with paired-bootstrap 95 % intervals, the
found weights, the LoRA's loss curve, timings, every prediction) and a ``.md`` table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from moa.data import load_slots
from moa.data.slots import SWITCH_TASKS, TASKS, training_set
from moa.eval.slots import by_task, paired_bootstrap
from moa.eval.teacher_forced import explicit_rows, teacher_forced_loss, teacher_forced_scores

logger = logging.getLogger("slots_baselines")

COMPOSITE_LORA = "composite_lora"
L1_PENALTY = 0.05  # LoraHub's regulariser


def train_composite_lora(model: Any, examples: list[Any], steps: int, batch_size: int, seed: int,
                         output_dir: Path | None = None) -> dict[str, Any]:
    """Add and train :data:`COMPOSITE_LORA` on ``examples`` with the shipped adapters' recipe (saved to ``output_dir``)."""
    import dataclasses

    from moa.train.recipes import DEMO_RECIPE
    from moa.train.sft import SFTConfig, add_training_adapter, train_adapter

    recipe = dataclasses.replace(DEMO_RECIPE, seed=seed)
    add_training_adapter(model, COMPOSITE_LORA, rank=recipe.rank, alpha=recipe.alpha, first_layer=recipe.first_layer,
                         projections=recipe.projections, dropout=recipe.dropout, seed=recipe.seed)
    config = SFTConfig(steps=steps, batch_size=batch_size, lr=recipe.lr, seed=seed, dev_limit=0)
    result = train_adapter(model, COMPOSITE_LORA, examples, config, output_dir=output_dir)
    return {"steps": steps, "batch_size": batch_size, "rank": recipe.rank, "lr": recipe.lr,
            "loss_curve": result.metrics["loss_curve"], "seconds": result.metrics["train_seconds"]}


def lorahub_search(model: Any, names: list[str], examples: list[Any], budget: int, seed: int) -> dict[str, Any]:
    """CMA-ES over one weight in [0, 1.5] per adapter: answer loss + L1, ``budget`` evaluations."""
    try:
        import cma
    except ImportError as error:  # a benchmark-only package
        raise SystemExit("benchmarks/slots_baselines.py needs the 'cma' package: .venv/bin/pip install -e '.[bench]'") from error

    history: list[tuple[list[float], float]] = []

    def objective(x: Any) -> float:
        weights = {n: float(w) for n, w in zip(names, x, strict=True) if w > 0}
        plan = explicit_rows(weights) if weights else explicit_rows(None)
        value = teacher_forced_loss(model, examples, plan) + L1_PENALTY * sum(abs(float(w)) for w in x)
        history.append(([round(float(w), 4) for w in x], round(value, 5)))
        logger.info("lorahub %d/%d: %s -> %.4f", len(history), budget, history[-1][0], value)
        return value

    start = time.perf_counter()
    options = {"bounds": [0.0, 1.5], "maxfevals": budget, "seed": seed + 1, "verbose": -9}
    best = cma.fmin2(objective, [1.0 / len(names)] * len(names), 0.3, options)[1]
    weights = [float(w) for w in best.result.xbest]
    return {"weights": dict(zip(names, weights, strict=True)), "objective": float(best.result.fbest),
            "evaluations": len(history), "history": history, "seconds": round(time.perf_counter() - start, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and score both baselines against the gate of ``args.against`` (see the module docstring)."""
    import moa
    from moa.eval.assets import load_adapters, shipped_adapters_dir

    against = json.loads(Path(args.against).read_text())
    n, seed = against["n_per_task"], against["seed"]
    torch.manual_seed(seed)
    by_id = {e.id: e for e in load_slots("test")}
    test = [by_id[i] for i in against["test_ids"]]
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    load_adapters(model, shipped_adapters_dir())
    names = list(model.adapter_names)
    composite = training_set(load_slots("train"), n)
    result: dict[str, Any] = {"n_per_task": n, "seed": seed, "against": str(args.against),
                              "test_items_per_task": against["test_items_per_task"]}
    hub = lorahub_search(model, names, training_set(load_slots("train"), min(n, args.search_n)), args.budget, seed)
    result["lorahub"] = hub
    steps = args.lora_steps or against["gate"]["training"]["steps"]
    saved = Path(args.out or Path(args.against).parent) / f"composite_lora_n{n}_seed{seed}"
    result["composite_lora"] = train_composite_lora(model, composite, steps, args.batch_size, seed, saved)
    result["composite_lora"]["saved"] = str(saved)
    plans = {"lorahub": explicit_rows({k: w for k, w in hub["weights"].items() if w > 0}),
             "composite_lora": explicit_rows(COMPOSITE_LORA)}
    predictions, token_accuracy, accuracy = {}, {}, {}
    for name, plan in plans.items():
        start = time.perf_counter()
        hits, shares = teacher_forced_scores(model, test, plan, batch_size=16, progress=not args.quiet, desc=name)
        predictions[name], token_accuracy[name], accuracy[name] = hits, by_task(test, shares), by_task(test, hits)
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
        logger.info("%s: %s", name, accuracy[name])
    gate = [bool(x) for x in against["predictions"]["token_gate"]]
    comparison: dict[str, dict[str, Any]] = {}
    for task in [t for t in TASKS if t in accuracy["lorahub"]]:
        index = [i for i, e in enumerate(test) if e.meta["task"] == task]
        comparison[task] = {}
        for name in plans:
            mean, low, high = paired_bootstrap([gate[i] for i in index], [predictions[name][i] for i in index])
            comparison[task][name] = {"gate_minus": mean, "ci95": [low, high]}
    result.update({"accuracy": accuracy, "token_accuracy": token_accuracy,
                   "token_gate_accuracy": against["summary"]["accuracy"]["token_gate"],
                   "token_gate_token_accuracy": against["token_accuracy"]["token_gate"],
                   "gate_minus_baseline": comparison,
                   "predictions": {k: [int(h) for h in v] for k, v in predictions.items()},
                   "test_ids": against["test_ids"], "switch_tasks": list(SWITCH_TASKS)})
    return result


def render_markdown(result: dict[str, Any]) -> str:
    """Exact match and token accuracy of both baselines next to the gate, and the paired differences."""
    tasks = list(result["accuracy"]["lorahub"])
    head = ["| config | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines = ["Exact match (teacher-forced), %:", "", *head]
    rows = {**result["accuracy"], "token_gate": result["token_gate_accuracy"]}
    lines += [f"| {k} | " + " | ".join(f"{100 * v[t]:.1f}" for t in tasks) + " |" for k, v in rows.items()]
    lines += ["", "Share of correct answer tokens, %:", "", *head]
    rows = {**result["token_accuracy"], "token_gate": result["token_gate_token_accuracy"]}
    lines += [f"| {k} | " + " | ".join(f"{100 * v[t]:.1f}" for t in tasks) + " |" for k, v in rows.items()]
    lines += ["", "| task | gate − LoraHub [95 % CI] | gate − composite LoRA [95 % CI] |", "|---|---|---|"]
    for task, c in result["gate_minus_baseline"].items():
        cells = [f"{100 * c[k]['gate_minus']:+.1f} [{100 * c[k]['ci95'][0]:+.1f}, {100 * c[k]['ci95'][1]:+.1f}]"
                 for k in ("lorahub", "composite_lora")]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    weights = ", ".join(f"{k} {v:.2f}" for k, v in result["lorahub"]["weights"].items())
    lines += ["", f"LoraHub weights found ({result['lorahub']['evaluations']} evaluations): {weights}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="benchmarks/slots_baselines.py", description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="a slots_mixing.py result JSON (N, seed, test items, gate)")
    parser.add_argument("--lora-steps", type=int, default=None, help="composite LoRA steps (default: the gate's)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--search-n", type=int, default=16, help="examples per task in LoraHub's objective")
    parser.add_argument("--budget", type=int, default=32, help="LoraHub objective evaluations")
    parser.add_argument("--out", default=None, help="folder (default: the --against file's)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    out = Path(args.out or Path(args.against).parent)
    tag = f"n{result['n_per_task']}_seed{result['seed']}"
    (out / f"slots_baselines_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"slots_baselines_{tag}.md").write_text(render_markdown(result))
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
