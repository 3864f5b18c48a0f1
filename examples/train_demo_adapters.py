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

With ``--data robust`` the adapters train on the context-robust mixes instead
(``moa.data.robust``: own task in >= 8 templates, after a foreign prefix, at the slot tasks'
hand-overs; the loss only on the segments the domain owns), same recipe. Each finished adapter
is written atomically (PEFT folder and ``train_metrics.json`` together); ``--save-steps``,
``--resume`` and ``--max-minutes`` make a long retrain a series of short, resumable chunks, with
checkpoints in ``<out>-checkpoints/<domain>/``.

Usage::

    python examples/train_demo_adapters.py                  # everything (hours on a 2-core CPU)
    python examples/train_demo_adapters.py --domains sql    # one adapter (then the gate again)
    python examples/train_demo_adapters.py --gate-only      # retrain the gate on the saved adapters
    python examples/train_demo_adapters.py --sweep-layers 0,1,2,3,4,6,8   # gate accuracy vs layer
    # context-robust adapters, one domain, in resumable chunks (exit status 3: not finished yet)
    python examples/train_demo_adapters.py --data robust --domains french --out adapters/robust \
        --no-gate --save-steps 25 --resume --max-minutes 50
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

import moa
from moa.atomic import atomic_directory
from moa.data import DOMAINS, HELD_OUT_PHRASINGS, load_split
from moa.data.chat import ensure_pad_token, pad_batch
from moa.data.robust import load_robust
from moa.eval.assets import load_adapters, shipped_adapters_dir
from moa.eval.teacher_forced import correct_positions
from moa.hub.directory import write_directory_page
from moa.hub.registry import sync_shipped_entries
from moa.train.recipes import DEMO_RECIPE, train_domain_adapter
from moa.train.router import collect_features, gate_accuracy, labels_for, train_gate_on_labels, train_router
from moa.train.sft import METRICS_NAME, dev_accuracy, encode_training_example, save_adapter_with_metrics

logger = logging.getLogger("train_demo_adapters")
MANIFEST = "manifest.json"
#: Exit status when --max-minutes stopped a run before its last step (rerun with --resume).
UNFINISHED = 3


class Deadline(TrainerCallback):
    """Stops training at the first step end past ``deadline`` (time.monotonic()), saving a checkpoint."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.stopped_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if time.monotonic() >= self.deadline and state.global_step < state.max_steps:
            control.should_save = True  # Trainer writes checkpoint-<step> before it stops
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def owned_token_exact(model: Any, adapter: str, examples: Sequence[Any], batch_size: int = 16) -> dict[str, float]:
    """Per kind of robust example, the share whose owned tokens are all argmax-correct (teacher-forced).

    For the hand-over kind this is the adapter's share of the oracle switch: every token it
    would be routed to in the slot format, given the gold context before it.
    """
    tokenizer = model.tokenizer
    ensure_pad_token(tokenizer)
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows = [encode_training_example(tokenizer, e) for e in chunk]
        batch = pad_batch([ids for ids, _ in rows], tokenizer.pad_token_id, labels=[labels for _, labels in rows])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device),
                           adapter_names=[adapter] * len(chunk), use_cache=False).logits.float().cpu()
        exact, _ = correct_positions(logits, batch["labels"])
        for example, hit in zip(chunk, exact.tolist()):
            hits.setdefault(example.meta["kind"], []).append(bool(hit))
    return {f"robust_dev_{kind}_exact": sum(v) / len(v) for kind, v in sorted(hits.items())}


def train_one(model: Any, domain: str, out: Path, args: argparse.Namespace, deadline: float | None) -> bool:
    """Train ``domain``'s adapter and write ``out/<domain>`` atomically; ``False`` if the deadline stopped it."""
    checkpoints = Path(args.checkpoint_root or f"{out}-checkpoints") / domain
    robust = args.data == "robust"
    train = load_robust(domain, "train") if robust else load_split(domain, "train")
    dev = load_split(domain, "dev")
    stop = Deadline(deadline) if deadline is not None else None
    result = train_domain_adapter(
        model, domain, output_dir=None, steps=args.steps, train_examples=train, dev_examples=dev, dev_limit=0,
        config_overrides={"save_steps": args.save_steps}, checkpoint_dir=checkpoints, resume=args.resume,
        callbacks=[stop] if stop else [])
    if stop is not None and stop.stopped_at is not None:
        model.delete_adapter(domain)
        logger.warning("%s: stopped at step %d of %d (--max-minutes); checkpoint in %s. Rerun with --resume.",
                       domain, stop.stopped_at, result.metrics["steps"], checkpoints)
        return False
    metrics = {**result.metrics, "data": args.data}
    if args.dev_limit > 0:
        metrics.update(dev_accuracy(model, domain, dev[:args.dev_limit]))
        if robust:
            metrics.update(owned_token_exact(model, domain, load_robust(domain, "dev")))
    with atomic_directory(out / domain) as folder:  # the adapter and its metrics appear together or not at all
        save_adapter_with_metrics(model, domain, folder, metrics)
    model.delete_adapter(domain)
    shutil.rmtree(checkpoints, ignore_errors=True)  # a later run of this domain must not resume a finished one
    logger.info("%s: %d steps, %.2f s/step, final loss %.4f, dev accuracy %.3f%s", domain, metrics["steps"],
                metrics["seconds_per_step"], metrics["final_loss"], metrics.get("dev_accuracy", float("nan")),
                "".join(f", {k} {v:.3f}" for k, v in metrics.items() if k.startswith("robust_dev_")))
    return True


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
    parser.add_argument("--data", choices=("demo", "robust"), default="demo",
                        help="train on the domain splits (demo) or on the context-robust mixes (moa.data.robust)")
    parser.add_argument("--save-steps", type=int, default=0, help="write a checkpoint every N steps (0: none)")
    parser.add_argument("--resume", action="store_true",
                        help="keep finished adapters; continue unfinished ones from their newest checkpoint")
    parser.add_argument("--max-minutes", type=float,
                        help="stop (checkpointing) after this many minutes; exit status 3 until all are done")
    parser.add_argument("--checkpoint-root", help="checkpoint folder (default <out>-checkpoints/<domain>)")
    parser.add_argument("--no-gate", action="store_true", help="train adapters only: no gate, no manifest")
    parser.add_argument("--dev-limit", type=int, default=48,
                        help="dev items generated for dev_accuracy (0: no dev scores, for a quick try)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    out = Path(args.out)
    if args.data == "robust" and out.resolve() == shipped_adapters_dir().resolve():
        logger.warning("Writing robust adapters over the shipped ones in %s.", out)
    model = moa.MixtureModel.from_pretrained("default", quantization=DEMO_RECIPE.quantization)
    if args.sweep_layers:
        table = sweep_layers(model, [int(x) for x in args.sweep_layers.split(",")])
        print(json.dumps(table, indent=1))
        return 0
    if not args.gate_only:
        for domain in args.domains.split(","):
            finished = (out / domain / METRICS_NAME).is_file()
            if (args.skip_existing or args.resume) and finished:
                logger.info("keeping %s", out / domain)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                logger.warning("--max-minutes reached before %s; rerun with --resume.", domain)
                return UNFINISHED
            if not train_one(model, domain, out, args, deadline):
                return UNFINISHED
    missing = [d for d in DOMAINS if not (out / d / METRICS_NAME).is_file()]
    if args.no_gate or (missing and not args.gate_only):  # a chunk of a longer run: the gate needs all five
        logger.info("gate and manifest not written (%s)", "--no-gate" if args.no_gate else f"missing: {missing}")
        return 0
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
