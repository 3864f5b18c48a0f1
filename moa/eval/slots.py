"""Scoring the slot tasks: every routing configuration, a per-token gate's agreement, the heatmap.

The pieces of the comparison that ``benchmarks/slots_mixing.py`` runs (it trains the
per-token gate, which this package does not import): the configurations compared
(:func:`configurations`), per-task accuracy and the paired bootstrap of the gate against
the best non-oracle baseline (:func:`summarise`), the share of answer positions where the
gate's top adapter owns the token being predicted (:func:`ownership_agreement`), the
tokens × adapters heatmap (:func:`heatmap`) and the Markdown table (:func:`render_markdown`).
Scoring is teacher-forced exact match (:mod:`moa.eval.teacher_forced`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moa.data.slots import SWITCH_TASKS, TASKS
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
    for task in [t for t in TASKS if any(e.meta["task"] == t for e in examples)]:
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


def token_gate_report(model: Any, gate: Router, examples: Sequence[Any], out_dir: Path) -> dict[str, Any]:
    """``moa eval``'s part for a per-token gate on slot-task items: exact match, agreement, heatmap.

    Scores ``examples`` teacher-forced under ``gate`` (exact match and the share of correct
    answer tokens, per task), measures the gate's agreement with segment ownership, and draws
    the tokens x adapters weights of the first item of each task to ``token_gate_heatmap.png``.
    """
    exact, shares = teacher_forced_scores(model, list(examples), routed_rows(gate), progress=True, desc="token gate")
    agreement = ownership_agreement(model, gate, [e for e in examples if e.meta["task"] in SWITCH_TASKS])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = heatmap(agreement["samples"], out_dir / "token_gate_heatmap.png")
    return {"exact": by_task(examples, exact), "token_accuracy": by_task(examples, shares),
            "ownership_agreement": agreement["agreement"], "positions": agreement["positions"],
            "items": len(examples), "heatmap": str(path)}
