"""Training sub-commands on ``transformers.Trainer``: ``train-adapter`` (SFT, LoRA/QLoRA) and ``train-router``.

Both run unchanged under ``accelerate launch`` (DDP; FSDP / DeepSpeed configs in ``examples/``).
"""

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


def _projections(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    from moa.train.sft import ALL_PROJECTIONS

    if not value:
        return default
    return ALL_PROJECTIONS if value == "all-linear" else tuple(v.strip() for v in value.split(",") if v.strip())


def _resume(value: str | None) -> bool | str:
    return False if value is None else (True if value == "latest" else value)


def _trainer_options(args: argparse.Namespace) -> dict[str, object]:
    """The Trainer settings shared by both commands (a paged optimizer without CUDA exits here)."""
    from moa.train.trainer import check_optimizer

    try:
        check_optimizer(args.optim)
    except ValueError as error:
        raise SystemExit(f"moa {args.command}: error: {error}") from None
    return {"gradient_accumulation_steps": args.gradient_accumulation_steps, "optim": args.optim,
            "save_steps": args.save_steps, "report_to": args.report_to}


def _add_trainer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gradient-accumulation-steps", type=int, default=1,
                   help="micro-batches per optimizer step (loss normalized over all their answer tokens)")
    p.add_argument("--optim", default="adamw_torch",
                   help="Trainer optimizer: adamw_torch, adamw_bnb_8bit; on CUDA paged_adamw_8bit / paged_adamw_32bit")
    p.add_argument("--save-steps", type=int, default=0, help="write a checkpoint every N steps (0 = none)")
    p.add_argument("--checkpoint-dir", help="checkpoint folder (train-adapter's default: <out>-checkpoints)")
    p.add_argument("--resume", nargs="?", const="latest",
                   help="continue from the newest checkpoint in --checkpoint-dir (or from the given checkpoint)")
    p.add_argument("--report-to", default="none", help="'none' or 'tensorboard' (runs/ in the checkpoint folder)")


def cmd_train_adapter(args: argparse.Namespace) -> int:
    """SFT one adapter on a built-in domain (or a JSONL file) and save it with its metrics."""
    import dataclasses

    import moa
    from moa.train.recipes import DEMO_RECIPE, load_jsonl_examples, train_domain_adapter

    _threads(args)
    if not args.domain and not args.train_file:
        raise SystemExit("moa train-adapter: give --domain NAME or --train-file FILE.jsonl")
    options = _trainer_options(args)
    domain = args.domain or "custom"
    recipe = dataclasses.replace(
        DEMO_RECIPE,
        rank=args.rank or DEMO_RECIPE.rank,
        alpha=args.alpha or 2.0 * (args.rank or DEMO_RECIPE.rank),
        first_layer=DEMO_RECIPE.first_layer if args.first_layer is None else args.first_layer,
        projections=_projections(args.projections, DEMO_RECIPE.projections),
        dropout=DEMO_RECIPE.dropout if args.dropout is None else args.dropout,
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
                                  dev_limit=args.dev_limit, config_overrides=options,
                                  checkpoint_dir=args.checkpoint_dir, resume=_resume(args.resume),
                                  progress=not args.quiet)
    from accelerate import PartialState

    if PartialState().is_main_process:
        m = result.metrics
        dev_text = f", dev accuracy {100 * m['dev_accuracy']:.1f} %" if "dev_accuracy" in m else ""
        print(f"saved {out}: {m['steps']} steps x {m['global_batch']} examples "
              f"({m['trainable_parameters']:,d} trainable parameters) in {m['train_seconds']:.0f} s "
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
    options = _trainer_options(args)
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
        lm_steps=args.lm_steps, seed=args.seed, progress=not args.quiet,
        lm_options={**options, "batch_size": args.lm_batch_size, "lr": args.lm_lr,
                    "checkpoint_dir": args.checkpoint_dir, "resume": _resume(args.resume)},
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
            "transformers' Trainer: the chat template, loss on the answer tokens only, warm-up and cosine "
            "decay, gradient accumulation, checkpoints and --resume, and saves a PEFT folder plus "
            "train_metrics.json. Runs unchanged under 'accelerate launch' (DDP, FSDP, DeepSpeed)."
        ),
    )
    p.add_argument("--domain", help="built-in domain: sql, arithmetic, icd, french, code")
    p.add_argument("--train-file", help="JSONL with 'prompt' and 'answer' per line (instead of --domain)")
    p.add_argument("--dev-file", help="JSONL dev examples (with --train-file)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the demo recipe's)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (default 0.05)")
    p.add_argument("--projections", help="'all-linear' or a comma list, e.g. q_proj,v_proj "
                   "(default: q,k,v,o,up,down)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_trainer_flags(p)
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
    r.add_argument("--lm-batch-size", type=int, default=8, help="examples per micro-batch (--mode lm)")
    r.add_argument("--lm-lr", type=float, default=1e-3, help="learning rate (--mode lm)")
    r.add_argument("--out", help="output folder (default <adapters>/router)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_trainer_flags(r)
    r.set_defaults(func=cmd_train_router)
