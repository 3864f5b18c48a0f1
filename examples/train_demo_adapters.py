"""Train the five shipped demo adapters and the learned gate, reproducibly.

What it does (fixed seeds, the recipe in ``moa.train.recipes.DEMO_RECIPE``):

1. loads the default base (SmolLM2-135M-Instruct) in NF4 and trains one LoRA per domain
   with QLoRA (the NF4 base): r=8, alpha=16, q/k/v/o/up/down projections of decoder
   layers 2..29 (the gate reads the input of layer 2, so routed outputs equal the
   oracle's), loss on the answer tokens only; saves each in fp16 (PEFT layout) with its
   ``train_metrics.json`` into ``moa/demo_adapters/<domain>/``;
2. reloads the saved adapters exactly as shipped, trains the learned gate on the domain
   labels (cached layer-2 features of the train prompts) and saves it to
   ``moa/demo_adapters/router/``;
3. writes ``moa/demo_adapters/manifest.json``: the sha256 of every shipped file, the base
   fingerprint, and each adapter's metrics; then (when writing the shipped folder) updates
   the registry entries ``registry/adapters/<domain>.toml`` and ``docs/directory.md``.

NF4 (QLoRA) rather than fp32: measured on our 2-core CPU, an SFT step costs the same on
both (25.0 s NF4 vs 27.1 s fp32 for a batch of 8 SQL examples, 6 steps each, same run,
cores shared), and adapters trained on the NF4 base are what the NF4 base serves.

Usage::

    python examples/train_demo_adapters.py                  # everything (hours on a 2-core CPU)
    python examples/train_demo_adapters.py --domains sql    # one adapter (then the gate again)
    python examples/train_demo_adapters.py --gate-only      # retrain the gate on the saved adapters
    python examples/train_demo_adapters.py --sweep-layers 0,1,2,3,4,6,8   # gate accuracy vs layer
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

import moa
from moa.data import DOMAINS, HELD_OUT_PHRASINGS, load_split
from moa.eval.assets import load_adapters, shipped_adapters_dir
from moa.hub.directory import write_directory_page
from moa.hub.registry import sync_shipped_entries
from moa.train.recipes import DEMO_RECIPE, train_domain_adapter
from moa.train.router import collect_features, gate_accuracy, labels_for, train_gate_on_labels, train_router

logger = logging.getLogger("train_demo_adapters")
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sweep_layers(model: Any, layers: list[int], per_domain: int = 150) -> dict[int, dict[str, float]]:
    """Gate accuracy (linear head, labels) vs the layer it reads: train, dev, held-out phrasings."""
    train = [e for d in DOMAINS for e in load_split(d, "train")[:per_domain]]
    dev = [e for d in DOMAINS for e in load_split(d, "dev")]
    held = [e for d in DOMAINS for e in load_split(d, "test") if e.phrasing in HELD_OUT_PHRASINGS[d]]
    feats = {name: collect_features(model, [e.prompt for e in ex], layers, progress=True)
             for name, ex in (("train", train), ("dev", dev), ("held_out", held))}
    table = {}
    for layer in layers:
        torch.manual_seed(0)
        gate = moa.get_router("learned_gate")(list(DOMAINS), model.config.hidden_size, hidden_layer=layer)
        train_gate_on_labels(gate, feats["train"][layer], labels_for(train, DOMAINS), epochs=100)
        table[layer] = {name: gate_accuracy(gate, feats[name][layer], labels_for(ex, DOMAINS))
                        for name, ex in (("train", train), ("dev", dev), ("held_out", held))}
        print(f"layer {layer}: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in table[layer].items()), flush=True)
    return table


def write_manifest(out: Path, model: Any) -> dict[str, Any]:
    """sha256 of every shipped file, plus the base fingerprint and each adapter's metrics.

    Also makes the shipped tree world-readable (atomic saves create private temp folders).
    """
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    metrics = {}
    for domain in DOMAINS:
        path = out / domain / "train_metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            metrics[domain] = {k: m.get(k) for k in ("steps", "final_loss", "dev_accuracy", "train_seconds",
                                                      "seconds_per_step")}
    manifest = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_fingerprint": model.base_fingerprint,
                "quantization": "nf4", "recipe": DEMO_RECIPE.__dict__, "files": files, "metrics": metrics,
                "total_bytes": sum((out / f).stat().st_size for f in files)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=list) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Train what the arguments ask for; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(shipped_adapters_dir()), help="output folder")
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated domains to train")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--skip-existing", action="store_true", help="keep adapters already saved in --out")
    parser.add_argument("--gate-only", action="store_true", help="only retrain the gate on the saved adapters")
    parser.add_argument("--sweep-layers", help="only print gate accuracy vs layer, e.g. 0,1,2,3,4")
    parser.add_argument("--steps", type=int, help="override the recipe's steps (for a quick try)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    model = moa.MixtureModel.from_pretrained("default", quantization=DEMO_RECIPE.quantization)
    if args.sweep_layers:
        table = sweep_layers(model, [int(x) for x in args.sweep_layers.split(",")])
        print(json.dumps(table, indent=1))
        return 0
    if not args.gate_only:
        for domain in args.domains.split(","):
            if args.skip_existing and (out / domain / "adapter_model.safetensors").is_file():
                logger.info("keeping %s", out / domain)
                continue
            start = time.perf_counter()
            result = train_domain_adapter(model, domain, out / domain, steps=args.steps, dev_limit=48)
            model.delete_adapter(domain)
            m = result.metrics
            logger.info("%s: %d steps, %.2f s/step, final loss %.4f, dev accuracy %.3f (%.0f s in all)", domain,
                        m["steps"], m["seconds_per_step"], m["final_loss"], m.get("dev_accuracy", float("nan")),
                        time.perf_counter() - start)
    names = load_adapters(model, out)
    domains = [d for d in DOMAINS if d in names]
    train = [e for d in domains for e in load_split(d, "train")[:400]]
    dev = [e for d in domains for e in load_split(d, "dev")]
    gate, metrics = train_router(model, train, domains, hidden_layer=DEMO_RECIPE.first_layer, dev_examples=dev,
                                 seed=DEMO_RECIPE.seed)
    gate.save(out / "router")
    logger.info("gate: %s", {k: v for k, v in metrics.items() if k != "lm"})
    manifest = write_manifest(out, model)
    logger.info("wrote %s: %d files, %.1f MB", out / MANIFEST, len(manifest["files"]), manifest["total_bytes"] / 1e6)
    if out.resolve() == shipped_adapters_dir().resolve():
        # the registry pins every shipped file: keep its entries and the directory page in step
        changed = sync_shipped_entries(write=True)
        write_directory_page()
        logger.info("registry entries updated: %s", ", ".join(changed) or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
