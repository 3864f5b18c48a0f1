"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_score_heatmap(result: Mapping[str, Any], path: Path) -> Path:
    """The domain × configuration scores (base, each adapter, oracle, gate, uniform) as a heatmap."""
    plt = _pyplot()
    domains, adapters = result["domains"], result["adapters"]
    columns = ["base", *adapters, "oracle", "gate", "uniform"]
    grid = []
    for d in domains:
        row = []
        for c in columns:
            value = result["matrix"][d].get(c) if c in adapters else result["scores"][d].get(c)
            row.append(float("nan") if value is None else 100 * value)
        grid.append(row)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(columns), 1.2 + 0.6 * len(domains)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(columns)), labels=columns, rotation=35, ha="right")
    ax.set_yticks(range(len(domains)), labels=domains)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=8)
    ax.axvline(len(adapters) + 0.5, color="white", linewidth=2)
    ax.set_xlabel("configuration (adapter columns: the domain × adapter matrix)")
    ax.set_ylabel("test domain")
    ax.set_title("% correct")
    fig.colorbar(image, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confusion(result: Mapping[str, Any], path: Path) -> Path:
    """The gate's routing confusion matrix (true domain × top-1 adapter)."""
    plt = _pyplot()
    routing = result["routing"]
    grid = routing["confusion"]
    labels, domains = routing["labels"], result["domains"]
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(labels), 1.2 + 0.6 * len(domains)))
    ax.imshow(grid, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(labels)), labels=labels, rotation=35, ha="right")
    ax.set_yticks(range(len(domains)), labels=domains)
    peak = max((max(r) for r in grid), default=1) or 1
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black", fontsize=8)
    ax.set_xlabel("adapter chosen by the gate (top-1)")
    ax.set_ylabel("true domain")
    overall = routing.get("overall")
    ax.set_title("routing confusion" + (f" (accuracy {100 * overall:.1f} %)" if overall is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_routing_weights(result: Mapping[str, Any], path: Path, per_domain: int = 40) -> Path:
    """Per-request routing weights of the gate: one column per request, grouped by true domain."""
    plt = _pyplot()
    labels = result["routing"]["labels"]
    requests = [r for r in result["records"] if r["config"] == "gate" and r["routing"]]
    shown: list[Mapping[str, Any]] = []
    for d in [*result["domains"], "composite"]:
        shown += [r for r in requests if r["domain"] == d][:per_domain]
    grid = [[r["routing"].get(a, 0.0) for r in shown] for a in labels] or [[0.0]]
    fig, ax = plt.subplots(figsize=(min(18, 2 + 0.06 * max(1, len(shown))), 1.2 + 0.45 * len(labels)))
    ax.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels=labels)
    ticks, names, start = [], [], 0
    for d in [*result["domains"], "composite"]:
        n = sum(1 for r in shown if r["domain"] == d)
        if n:
            ticks.append(start + (n - 1) / 2)
            names.append(d)
            if start:
                ax.axvline(start - 0.5, color="cyan", linewidth=1)
            start += n
    ax.set_xticks(ticks, labels=names)
    ax.set_xlabel("requests, grouped by true domain")
    ax.set_ylabel("adapter weight")
    ax.set_title("learned gate: routing weights per request")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(result: Mapping[str, Any], directory: Path) -> dict[str, Path]:
    """All plots into ``directory``; returns ``{name: path}``."""
    out = {"scores_png": plot_score_heatmap(result, directory / "scores_heatmap.png")}
    if any(sum(r) for r in result["routing"]["confusion"]):
        out["confusion_png"] = plot_confusion(result, directory / "routing_confusion.png")
        out["routing_png"] = plot_routing_weights(result, directory / "routing_weights.png")
    return out
