"""Training sub-commands: ``train-adapter`` (SFT, LoRA/QLoRA, DDP-ready) and ``train-router``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _quant(value: str) -> str | None:
    return None if value == "none" else value


def _threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_train_adapter(args: argparse.Namespace) -> int:
    """SFT one adapter on a built-in domain (or a JSONL file) and save it with its metrics."""
    import dataclasses

    import moa
    from moa.train.recipes import DEMO_RECIPE, load_jsonl_examples, train_domain_adapter

    _threads(args)
    if not args.domain and not args.train_file:
        raise SystemExit("moa train-adapter: give --domain NAME or --train-file FILE.jsonl")
    domain = args.domain or "custom"
    recipe = dataclasses.replace(
        DEMO_RECIPE,
        rank=args.rank or DEMO_RECIPE.rank,
        alpha=args.alpha or 2.0 * (args.rank or DEMO_RECIPE.rank),
        first_layer=DEMO_RECIPE.first_layer if args.first_layer is None else args.first_layer,
        batch_size=args.batch_size or DEMO_RECIPE.batch_size,
        lr=args.lr or DEMO_RECIPE.lr,
        seed=args.seed,
        quantization=_quant(args.quantization),
    )
    model = moa.MixtureModel.from_pretrained(args.base, quantization=recipe.quantization)
    train = dev = None
    if args.train_file:
        train = load_jsonl_examples(args.train_file, domain)
        dev = load_jsonl_examples(args.dev_file, domain) if args.dev_file else []
    out = Path(args.out or f"adapters/{domain}")
    result = train_domain_adapter(model, domain, out, recipe=recipe, steps=args.steps, train_examples=train,
                                  dev_examples=dev, gradient_checkpointing=args.gradient_checkpointing,
                                  dev_limit=args.dev_limit)
    from accelerate import PartialState

    if PartialState().is_main_process:
        m = result.metrics
        dev_text = f", dev accuracy {100 * m['dev_accuracy']:.1f} %" if "dev_accuracy" in m else ""
        print(f"saved {out}: {m['steps']} steps x {m['global_batch']} examples in {m['train_seconds']:.0f} s "
              f"({m['seconds_per_step']:.2f} s/step), final loss {m['final_loss']:.4f}{dev_text}")
    return 0


def cmd_train_router(args: argparse.Namespace) -> int:
    """Train the learned gate over a folder of adapters and save it."""
    import moa
    from moa.data import DOMAINS, load_split
    from moa.eval.assets import load_adapters, router_dir, shipped_adapters_dir
    from moa.train.recipes import DEFAULT_HIDDEN_LAYER
    from moa.train.router import train_router

    _threads(args)
    adapters_dir = Path(args.adapters) if args.adapters else shipped_adapters_dir()
    model = moa.MixtureModel.from_pretrained(args.base, quantization=_quant(args.quantization))
    names = load_adapters(model, adapters_dir)
    domains = [d for d in names if d in DOMAINS]
    train = [e for d in domains for e in load_split(d, "train")[: args.examples_per_domain]]
    dev = [e for d in domains for e in load_split(d, "dev")]
    gate, metrics = train_router(
        model, train, domains,
        hidden_layer=DEFAULT_HIDDEN_LAYER if args.hidden_layer is None else args.hidden_layer,
        mode=args.mode, level=args.level, dev_examples=dev, top_k=args.top_k, temperature=args.temperature,
        lm_steps=args.lm_steps, seed=args.seed,
    )
    out = Path(args.out) if args.out else router_dir(adapters_dir)
    gate.save(out)
    shown = {k: v for k, v in metrics.items() if k not in ("lm",)}
    print(f"saved gate {out}: {json.dumps(shown, default=str)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train-adapter`` and ``train-router``."""
    p = sub.add_parser(
        "train-adapter",
        help="SFT a LoRA adapter (QLoRA on the NF4 base or fp32), loss on the answer only",
        description=(
            "Trains one LoRA adapter on a built-in domain (or a JSONL file of prompt/answer lines) with "
            "the chat template, loss on the answer tokens only, AdamW with warm-up and cosine decay, and "
            "saves a PEFT folder plus train_metrics.json. Runs unchanged under 'accelerate launch' (DDP)."
        ),
    )
    p.add_argument("--domain", help="built-in domain: sql, arithmetic, icd, french, code")
    p.add_argument("--train-file", help="JSONL with 'prompt' and 'answer' per line (instead of --domain)")
    p.add_argument("--dev-file", help="JSONL dev examples (with --train-file)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--first-layer", type=int, help="first decoder layer carrying the adapter (default: the gate's)")
    p.add_argument("--batch-size", type=int, help="examples per step per process (default 8)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"], help="base quantization (nf4 = QLoRA)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--base", default="default", help="base model: 'default', a folder or a Hub id")
    p.add_argument("--dev-limit", type=int, default=64, help="dev examples generated for the dev accuracy")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="output folder (default adapters/<domain>)")
    p.set_defaults(func=cmd_train_adapter)

    r = sub.add_parser(
        "train-router",
        help="train the learned gate over a folder of adapters (labels or end-to-end LM loss)",
        description=(
            "Trains the learned gate: a small head on the base's hidden states at one layer, on the "
            "domain labels (cached features, seconds) or end to end through the mixture's LM loss with "
            "the adapters frozen. Saves router_config.json + router.safetensors."
        ),
    )
    r.add_argument("--adapters", help="folder of adapter folders named by domain (default: the shipped ones)")
    r.add_argument("--mode", default="labels", choices=["labels", "lm"])
    r.add_argument("--level", default="sequence", choices=["sequence", "token"])
    r.add_argument("--hidden-layer", type=int, help="decoder layer whose input the gate reads")
    r.add_argument("--top-k", type=int, default=1)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--lm-steps", type=int, default=30, help="steps of end-to-end training (--mode lm)")
    r.add_argument("--examples-per-domain", type=int, default=400, help="train prompts per domain")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    r.add_argument("--base", default="default")
    r.add_argument("--threads", type=int)
    r.add_argument("--out", help="output folder (default <adapters>/router)")
    r.set_defaults(func=cmd_train_router)
