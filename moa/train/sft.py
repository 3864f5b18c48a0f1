"""Adapter SFT: LoRA on a dense base, or QLoRA on the NF4 base, loss on the answer only.

One loop serves a single process and ``accelerate launch`` (DDP, gloo on CPU) alike:
the model and optimizer go through :class:`accelerate.Accelerator`, every rank takes its
own slice of each global batch, gradients are averaged by DDP, and rank 0 saves. Only
the adapter being trained has ``requires_grad``; AdamW sees only its parameters.

Example::

    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    add_training_adapter(model, "sql", rank=8, first_layer=2)
    result = train_adapter(model, "sql", load_split("sql", "train"), SFTConfig(steps=100),
                           dev_examples=load_split("sql", "dev"), output_dir="adapters/sql")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from moa.atomic import atomic_write_bytes
from moa.data.chat import encode_sft_example, ensure_pad_token, pad_batch

logger = logging.getLogger(__name__)

METRICS_NAME = "train_metrics.json"
#: The linear layers of a Llama-style decoder layer.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TextPair(Protocol):
    """Anything with a ``prompt`` and an ``answer`` (``moa.data.Example`` qualifies)."""

    prompt: str
    answer: str


@dataclasses.dataclass
class SFTConfig:
    """Hyper-parameters of one SFT run.

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per step *per process*.
        lr: Peak learning rate (AdamW).
        warmup_steps: Linear warm-up, then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping (0 = off).
        max_length: Tokens per example (the prompt's start is cut first).
        gradient_checkpointing: Recompute activations in the backward pass.
        seed: Seeds the adapter's initialisation and the data order.
        dev_limit: Dev examples generated for the accuracy in the metrics (0 = skip).
        save_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for the saved weights.
    """

    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 8
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 1024
    gradient_checkpointing: bool = False
    seed: int = 0
    dev_limit: int = 64
    save_dtype: str = "float16"


@dataclasses.dataclass
class SFTResult:
    """What a run produced: its metrics (also written next to the adapter) and where."""

    metrics: dict[str, Any]
    output_dir: Path | None


def layer_target_regex(num_layers: int, first_layer: int = 0, projections: Sequence[str] = ALL_PROJECTIONS) -> str:
    """A ``target_modules`` regex for ``projections`` of decoder layers ``first_layer..``.

    Adapters trained only on layers ``>= L`` behave the same whether they are applied
    everywhere or only from layer ``L`` on, which is what a gate routing on the hidden
    states of layer ``L`` does.
    """
    layers = "|".join(str(i) for i in range(int(first_layer), int(num_layers)))
    return rf"model\.layers\.({layers})\.(self_attn|mlp)\.({'|'.join(projections)})"


def add_training_adapter(
    model: Any,
    adapter_name: str,
    rank: int = 8,
    alpha: float | None = None,
    first_layer: int = 0,
    projections: Sequence[str] = ALL_PROJECTIONS,
    dropout: float = 0.05,
    seed: int = 0,
) -> Any:
    """Add a fresh LoRA adapter (identity at start) on layers ``first_layer..`` of ``model``."""
    from moa.adapters.lora import LoraConfig

    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha if alpha is not None else 2 * rank),
        lora_dropout=dropout,
        target_modules=layer_target_regex(model.config.num_hidden_layers, first_layer, projections),
    )
    torch.manual_seed(seed)
    model.add_adapter(adapter_name, config)
    return config


def set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Turn activation checkpointing of the base on (non-reentrant) or off.

    See :meth:`moa.MixtureModel.gradient_checkpointing_enable` (tested: same gradients as
    without checkpointing).
    """
    if enabled:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()


def lr_lambda(config: SFTConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine decay, as a multiplier of ``config.lr``."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / max(1, config.warmup_steps)
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine

    return factor


def adapter_parameters(model: Any, adapter_name: str) -> list[torch.nn.Parameter]:
    """The trainable tensors of one adapter (every other parameter is frozen)."""
    params: list[torch.nn.Parameter] = []
    for layer in model.adapter_layers(adapter_name).values():
        params.extend(layer.parameters())
    return params


def weights_digest(params: Sequence[torch.Tensor]) -> str:
    """sha256 over the bytes of ``params`` (to check that DDP ranks agree)."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") and not hasattr(model, "adapter_layers") else model


def train_adapter(
    model: Any,
    adapter_name: str,
    train_examples: Sequence[TextPair],
    config: SFTConfig | None = None,
    dev_examples: Sequence[Any] | None = None,
    output_dir: str | os.PathLike | None = None,
    accelerator: Any = None,
    progress: bool = True,
    extra_metrics: dict[str, Any] | None = None,
) -> SFTResult:
    """Train ``adapter_name`` (already added to ``model``) on prompt -> answer pairs.

    Args:
        model: A :class:`moa.MixtureModel` holding the adapter (dense or NF4 base).
        adapter_name: The adapter to train; all other parameters stay frozen.
        train_examples: Objects with ``prompt`` and ``answer``.
        config: Hyper-parameters (defaults: :class:`SFTConfig`).
        dev_examples: Optional examples (``moa.data.Example``) for a dev accuracy.
        output_dir: Where rank 0 saves the PEFT adapter and ``train_metrics.json``.
        accelerator: An ``accelerate.Accelerator`` (one is made if ``None``).
        progress: Show a tqdm bar with the loss (rank 0 only).
        extra_metrics: Merged into the saved metrics (domain, base, ...).

    Returns:
        The metrics and the output folder.
    """
    from accelerate import Accelerator

    config = config or SFTConfig()
    if not train_examples:
        raise ValueError("train_adapter needs at least one training example.")
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = model.tokenizer
    ensure_pad_token(tokenizer)
    encoded = [encode_sft_example(tokenizer, e.prompt, e.answer, config.max_length) for e in train_examples]
    params = adapter_parameters(model, adapter_name)
    for p in params:
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in params)
    if config.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    model.train()
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses: list[float] = []
    tokens_seen = 0
    bar = tqdm(range(config.steps), desc=f"sft {adapter_name}", unit="step",
               disable=not (progress and accelerator.is_main_process))
    start = time.perf_counter()
    for _step in bar:
        need = config.batch_size * world
        while len(order) < need:
            order.extend(torch.randperm(len(encoded), generator=generator).tolist())
        global_batch, order = order[:need], order[need:]
        mine = global_batch[rank * config.batch_size : (rank + 1) * config.batch_size]
        batch = pad_batch([encoded[i][0] for i in mine], tokenizer.pad_token_id,
                          labels=[encoded[i][1] for i in mine])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = wrapped(**batch, adapter_names=[adapter_name] * len(mine), use_cache=False)
        accelerator.backward(out.loss)
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(accelerator.reduce(out.loss.detach(), reduction="mean"))
        losses.append(loss)
        tokens_seen += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
    seconds = time.perf_counter() - start
    bar.close()
    inner = _unwrap(accelerator.unwrap_model(wrapped))
    inner.eval()
    if config.gradient_checkpointing:
        set_gradient_checkpointing(inner, False)
    for p in params:
        p.requires_grad_(False)
    from accelerate.utils import gather_object

    digests = gather_object([weights_digest(params)])
    tail = losses[-min(10, len(losses)):] or [float("nan")]
    metrics: dict[str, Any] = {
        "adapter": adapter_name,
        "steps": config.steps,
        "processes": world,
        "global_batch": config.batch_size * world,
        "trainable_parameters": trainable,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail),
        "loss_curve": [round(x, 5) for x in losses],
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(1, config.steps), 3),
        "tokens_per_process": tokens_seen,
        "train_examples": len(train_examples),
        "rank_weight_digests": list(digests),
        "config": dataclasses.asdict(config),
        **(extra_metrics or {}),
    }
    if dev_examples and config.dev_limit > 0 and accelerator.is_main_process:
        metrics.update(dev_accuracy(inner, adapter_name, list(dev_examples)[: config.dev_limit]))
    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None and accelerator.is_main_process:
        save_adapter_with_metrics(inner, adapter_name, out_dir, metrics, config.save_dtype)
    accelerator.wait_for_everyone()
    logger.info("Adapter %r: %d steps in %.1f s, final loss %.4f.", adapter_name, config.steps, seconds,
                metrics["final_loss"])
    return SFTResult(metrics=metrics, output_dir=out_dir)


def dev_accuracy(model: Any, adapter_name: str, examples: Sequence[Any], batch_size: int = 16) -> dict[str, Any]:
    """Greedy answers of ``adapter_name`` on ``examples`` and the share scored correct."""
    from moa.eval.runner import generate_answers, score_examples
    from moa.data.chat import answer_token_budget

    budget = answer_token_budget(model.tokenizer, [e.answer for e in examples])
    answers = generate_answers(model, [e.prompt for e in examples], [{adapter_name: 1.0}] * len(examples),
                               max_new_tokens=budget, batch_size=batch_size, progress=False)
    correct = score_examples(examples, answers)
    return {"dev_accuracy": sum(correct) / max(1, len(correct)), "dev_examples": len(correct)}


def save_adapter_with_metrics(
    model: Any, adapter_name: str, directory: Path, metrics: dict[str, Any], dtype: str = "float16"
) -> None:
    """Save the adapter (PEFT folder, weights cast to ``dtype``) and ``train_metrics.json`` in it."""
    layers = list(model.adapter_layers(adapter_name).values())
    original = next(layers[0].parameters()).dtype
    target = getattr(torch, dtype)
    for layer in layers:
        layer.to(target)
    try:
        model.save_adapter(adapter_name, directory)
    finally:
        for layer in layers:
            layer.to(original)
    atomic_write_bytes(directory / METRICS_NAME, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
