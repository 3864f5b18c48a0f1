"""Evaluation results: the summary dict (JSON), its Markdown table, and the files on disk."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa.atomic import atomic_write_bytes

JSON_NAME = "eval.json"
MARKDOWN_NAME = "eval.md"


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _held_out(example: Any) -> bool:
    try:
        from moa.data import HELD_OUT_PHRASINGS
    except ImportError:  # pragma: no cover
        return False
    return getattr(example, "phrasing", None) in HELD_OUT_PHRASINGS.get(getattr(example, "domain", ""), ())


def summarise(
    jobs: Sequence[Any],
    domains: Sequence[str],
    adapters: Sequence[str],
    gate: Any,
    picked: Mapping[str, Sequence[Any]],
    composite: Sequence[Any],
    budgets: Mapping[str, int],
    timings: Mapping[str, float],
    config: Any,
) -> dict[str, Any]:
    """Turn finished jobs into the result dict written as ``eval.json``."""
    domain_set = set(domains)
    composite_ids = {id(e) for e in composite}
    by: dict[tuple[str, str], list[bool]] = defaultdict(list)
    comp_by: dict[str, list[bool]] = defaultdict(list)
    records = []
    for job in jobs:
        e = job.example
        if id(e) in composite_ids:
            comp_by[job.config].append(job.correct)
            domain = "composite"
        else:
            by[(e.domain, job.config)].append(job.correct)
            domain = e.domain
        records.append({
            "id": getattr(e, "id", None), "domain": domain, "config": job.config,
            "phrasing": getattr(e, "phrasing", None), "prediction": job.prediction,
            "answer": e.answer, "correct": job.correct, "routing": job.routing,
        })
    matrix = {d: {a: _mean(by[(d, f"adapter:{a}")]) for a in adapters} for d in domains}
    matrix_examples = {d: {a: len(by[(d, f"adapter:{a}")]) for a in adapters} for d in domains}
    scores: dict[str, dict[str, float | None]] = {}
    for d in domains:
        oracle = matrix[d].get(d) if by[(d, f"adapter:{d}")] else _mean(by[(d, "oracle")])
        row = {"base": _mean(by[(d, "base")]), "oracle": oracle, "gate": _mean(by[(d, "gate")]),
               "uniform": _mean(by[(d, "uniform")])}
        row["gate_over_oracle"] = row["gate"] / oracle if row["gate"] is not None and oracle else None
        row["adapter_minus_base"] = (oracle - row["base"]) if oracle is not None and row["base"] is not None else None
        scores[d] = row
    routing = _routing_summary([j for j in jobs if j.config == "gate" and id(j.example) not in composite_ids],
                               domains, list(gate.gate_adapters) if hasattr(gate, "gate_adapters") else list(adapters))
    composite_scores = {c: _mean(v) for c, v in sorted(comp_by.items())}
    composite_routing = [
        {"id": j.example.id if hasattr(j.example, "id") else None, "routing": j.routing}
        for j in jobs if j.config == "gate" and id(j.example) in composite_ids
    ]
    return {
        "domains": list(domains),
        "adapters": list(adapters),
        "examples_per_domain": {d: len(picked[d]) for d in domains},
        "held_out_per_domain": {d: sum(_held_out(e) for e in picked[d]) for d in domains},
        "max_new_tokens": dict(budgets),
        "scores": scores,
        "matrix": matrix,
        "matrix_examples": matrix_examples,
        "routing": routing,
        "composite": {"examples": len(composite), "scores": composite_scores, "routing": composite_routing},
        "gate": gate.config_dict() if hasattr(gate, "config_dict") else (repr(gate) if gate else None),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "config": {"limit": config.limit, "matrix_limit": getattr(config, "matrix_limit", None),
                   "batch_size": config.batch_size, "configs": list(config.configs)},
        "records": records,
        "unknown_domains": sorted({r["domain"] for r in records} - domain_set - {"composite"}),
    }


def _routing_summary(jobs: Sequence[Any], domains: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Routing accuracy (top-1 of the gate's weights vs the true domain) and confusion matrix."""
    confusion = [[0] * len(labels) for _ in domains]
    hits: dict[str, list[bool]] = defaultdict(list)
    held: dict[str, list[bool]] = defaultdict(list)
    for job in jobs:
        if not job.routing:
            continue
        chosen = max(job.routing.items(), key=lambda kv: kv[1])[0]
        d = job.example.domain
        if chosen in labels and d in domains:
            confusion[list(domains).index(d)][list(labels).index(chosen)] += 1
        hits[d].append(chosen == d)
        if _held_out(job.example):
            held[d].append(chosen == d)
    everything = [h for v in hits.values() for h in v]
    held_all = [h for v in held.values() for h in v]
    return {
        "labels": list(labels),
        "accuracy": {d: _mean(hits[d]) for d in domains},
        "accuracy_held_out": {d: _mean(held[d]) for d in domains},
        "overall": _mean(everything),
        "overall_held_out": _mean(held_all),
        "confusion": confusion,
    }


def _matrix_sizes_note(result: Mapping[str, Any]) -> list[str]:
    """A line saying how many examples the off-diagonal cells used, when fewer than the diagonal's."""
    sizes = result.get("matrix_examples") or {}
    off = sorted({n for d, row in sizes.items() for a, n in row.items() if a != d and n})
    diagonal = sorted({row.get(d, 0) for d, row in sizes.items()})
    if not off or off == diagonal:
        return []
    span = f"{off[0]}" if len(off) == 1 else f"{off[0]}-{off[-1]}"
    return [f"Diagonal cells on every test example; off-diagonal cells on the first {span} of each domain.", ""]


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The result as Markdown: scores, matrix, routing, confusion, composite."""
    domains, adapters = result["domains"], result["adapters"]
    s, r = result["scores"], result["routing"]
    lines = ["## Scores per domain (% correct on the test set)", "",
             "| domain | n | base | oracle | learned gate | uniform | gate / oracle | adapter − base | "
             "routing acc | routing acc (held-out phrasings) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in domains:
        row = s[d]
        ratio = "—" if row["gate_over_oracle"] is None else f"{100 * row['gate_over_oracle']:.1f} %"
        lines.append(
            f"| {d} | {result['examples_per_domain'][d]} | {_pct(row['base'])} | {_pct(row['oracle'])} | "
            f"{_pct(row['gate'])} | {_pct(row['uniform'])} | {ratio} | {_pct(row['adapter_minus_base'])} | "
            f"{_pct(r['accuracy'].get(d))} | {_pct(r['accuracy_held_out'].get(d))} "
            f"(n={result['held_out_per_domain'].get(d, 0)}) |")
    lines += ["", f"Routing accuracy overall: {_pct(r['overall'])} %; on held-out phrasings: "
              f"{_pct(r['overall_held_out'])} %.", ""]
    if any(v is not None for row in result["matrix"].values() for v in row.values()):
        lines += ["## Domain × adapter matrix (% correct; rows: test domain, columns: adapter)", "",
                  *_matrix_sizes_note(result),
                  "| domain \\ adapter | " + " | ".join(adapters) + " |",
                  "|---|" + "---|" * len(adapters)]
        for d in domains:
            cells = [(f"**{_pct(result['matrix'][d][a])}**" if a == d else _pct(result["matrix"][d][a]))
                     for a in adapters]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines.append("")
    if any(sum(row) for row in r["confusion"]):
        lines += ["## Routing confusion (rows: true domain, columns: gate's top adapter)", "",
                  "| true \\ routed | " + " | ".join(r["labels"]) + " |", "|---|" + "---|" * len(r["labels"])]
        for d, row in zip(domains, r["confusion"], strict=True):
            lines.append(f"| {d} | " + " | ".join(str(c) for c in row) + " |")
        lines.append("")
    comp = result["composite"]
    if comp["examples"]:
        lines += [f"## Composite prompts (n={comp['examples']}; no single adapter covers them)", "",
                  "| configuration | % correct |", "|---|---|"]
        lines += [f"| {c} | {_pct(v)} |" for c, v in comp["scores"].items()]
        lines.append("")
    t = result.get("timings", {})
    lines.append("Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) +
                 f"; max_new_tokens per domain: {result['max_new_tokens']}.")
    return "\n".join(lines) + "\n"


def write_report(result: Mapping[str, Any], directory: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` and the PNG plots into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME}
    atomic_write_bytes(paths["json"], (json.dumps(result, indent=1, sort_keys=False) + "\n").encode())
    atomic_write_bytes(paths["markdown"], render_markdown(result).encode())
    if plots:
        from moa.eval.plots import write_plots

        paths.update(write_plots(result, out))
    return paths
