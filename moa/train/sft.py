"""Adapter SFT on ``transformers.Trainer``: LoRA on a dense base, or QLoRA on the NF4 base.

The loss is on the answer only (the chat template of :func:`moa.data.chat.encode_sft_example`),
or on the parts of it an example's ``meta["loss_spans"]`` names (:func:`encode_training_example`:
a segment after a foreign prefix, written by another adapter, is context, not target);
only the adapter being trained has ``requires_grad``. :class:`moa.train.trainer.MixtureTrainer`
brings Trainer's gradient accumulation, checkpoints (adapter tensors + optimizer, scheduler and
RNG state) and resuming, ``optim`` (``adamw_torch``, ``adamw_bnb_8bit``, paged AdamW on CUDA),
gradient checkpointing of the base, tqdm / TensorBoard logging, and ``accelerate launch``
(DDP, FSDP, DeepSpeed) with every rank on its own slice of each global batch. Rank 0 saves
the adapter as a PEFT folder with ``train_metrics.json``.

Example::

    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    add_training_adapter(model, "sql", rank=8, first_layer=2)
    result = train_adapter(model, "sql", load_split("sql", "train"), SFTConfig(steps=100),
                           dev_examples=load_split("sql", "dev"), output_dir="adapters/sql")
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from moa.atomic import atomic_write_bytes
from moa.data.chat import encode_sft_example, end_of_turn, ensure_pad_token, pad_batch
from moa.train.extensions import adapter_training_extension
from moa.train.trainer import (
    MixtureTrainer,
    OrderedDataset,
    last_checkpoint,
    report_trainable,
    training_arguments,
    unrolled_order,
)

logger = logging.getLogger(__name__)

METRICS_NAME = "train_metrics.json"
#: The linear layers of a Llama-style decoder layer.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TextPair(Protocol):
    """Anything with a ``prompt`` and an ``answer`` (``moa.data.Example`` qualifies).

    An optional ``meta`` dict may carry ``loss_spans`` (see :func:`encode_training_example`).
    """

    prompt: str
    answer: str


#: ``meta`` key of the answer's character ranges that carry the loss (the rest is context).
LOSS_SPANS = "loss_spans"


def loss_span_mask(tokenizer: Any, answer: str, spans: Sequence[Sequence[int]]) -> list[bool]:
    """Which tokens of ``answer + end-of-turn`` carry the loss, given character ranges of ``answer``.

    A token is trained when its first character lies in a span ``[start, end)``; the
    end-of-turn token when a span ends at the answer's end. This is the ownership rule of
    the oracle switch (:func:`moa.eval.teacher_forced.token_owners`: a token belongs to the
    segment holding its first character, the end token to the last segment), so an adapter
    is trained on exactly the positions the oracle switch would route to it.

    Raises:
        ValueError: A span outside the answer or empty, or spans that train no token.
    """
    checked = []
    for span in spans:
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end <= len(answer):
            raise ValueError(f"Loss span {[start, end]} is not a non-empty range of the {len(answer)}-character "
                             f"answer {answer[:40]!r}.")
        checked.append((start, end))
    encoded = tokenizer(answer + end_of_turn(tokenizer), add_special_tokens=False, return_offsets_mapping=True)
    reaches_end = any(end == len(answer) for _, end in checked)
    mask = [any(start <= first < end for start, end in checked) or (first >= len(answer) and reaches_end)
            for first, _last in encoded["offset_mapping"]]
    if not any(mask):
        raise ValueError(f"Loss spans {checked} of the answer {answer[:40]!r} cover no token's first character.")
    return mask


def encode_training_example(tokenizer: Any, example: TextPair, max_length: int = 1024) -> tuple[list[int], list[int]]:
    """:func:`moa.data.chat.encode_sft_example`, with the loss limited to ``meta["loss_spans"]`` if given.

    Without ``loss_spans`` every answer token and the end-of-turn token are trained. With
    them (``[[start, end], ...]``, character offsets into the answer), the other answer
    tokens get label ``-100``: they stay in the input as context (a foreign prefix in the
    assistant turn, a frame another adapter writes) but carry no loss.

    Returns:
        ``(input_ids, labels)``, equal length.
    """
    ids, labels = encode_sft_example(tokenizer, example.prompt, example.answer, max_length)
    spans = (getattr(example, "meta", None) or {}).get(LOSS_SPANS)
    if spans is None:
        return ids, labels
    mask = loss_span_mask(tokenizer, example.answer, spans)
    head = len(labels) - len(mask)  # the answer's tokens are the last ones (only the prompt is ever cut)
    return ids, labels[:head] + [label if keep else -100 for label, keep in zip(labels[head:], mask)]


@dataclasses.dataclass
class SFTConfig:
    """Hyper-parameters of one SFT run.

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per micro-batch *per process*.
        lr: Peak learning rate.
        warmup_steps: Linear warm-up, then cosine decay to ``min_lr_ratio * lr``.
        min_lr_ratio: Final learning rate as a fraction of ``lr``.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping (0 = off).
        max_length: Tokens per example (the prompt's start is cut first).
        gradient_checkpointing: Recompute activations in the backward pass.
        seed: Seeds the adapter's initialisation and the data order.
        dev_limit: Dev examples generated for the accuracy in the metrics (0 = skip).
        save_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for the saved weights.
        gradient_accumulation_steps: Micro-batches per optimizer step (the global batch is
            ``batch_size * gradient_accumulation_steps * processes``; the loss is the mean over
            all of its answer tokens, so 4 x 2 trains exactly as 1 x 8).
        optim: Trainer's optimizer name: ``adamw_torch``, ``adamw_bnb_8bit``, and on CUDA
            ``paged_adamw_8bit`` / ``paged_adamw_32bit`` (QLoRA's).
        save_steps: Write a checkpoint every this many steps (0 = none).
        save_total_limit: Keep at most this many checkpoints (``None`` = all).
        logging_steps: Log the loss every this many steps.
        report_to: ``"none"``, ``"tensorboard"`` (or any of Trainer's integrations, comma-separated).
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
    gradient_accumulation_steps: int = 1
    optim: str = "adamw_torch"
    save_steps: int = 0
    save_total_limit: int | None = None
    logging_steps: int = 10
    report_to: str = "none"


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


def _collator(pad_id: int) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return pad_batch([r["input_ids"] for r in rows], pad_id, labels=[r["labels"] for r in rows])

    return collate


def checkpoint_folder(output_dir: str | os.PathLike) -> Path:
    """Where a run saving to ``output_dir`` keeps its checkpoints: ``<output_dir>-checkpoints``.

    Beside the adapter folder, not in it: the adapter is saved by replacing its folder.
    """
    out = Path(output_dir)
    return out.parent / f"{out.name}-checkpoints"


def _tokens_of_rank(lengths: Sequence[int], order: Sequence[int], batch_size: int, world: int, rank: int) -> int:
    """Tokens this rank reads: accelerate gives rank ``r`` batches ``r, r + world, ...``."""
    return sum(lengths[i] for pos, i in enumerate(order) if (pos // batch_size) % world == rank)


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
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    callbacks: Sequence[Any] = (),
) -> SFTResult:
    """Train ``adapter_name`` (already added to ``model``) on prompt -> answer pairs with Trainer.

    Args:
        model: A :class:`moa.MixtureModel` holding the adapter (dense or NF4 base).
        adapter_name: The adapter to train; all other parameters stay frozen.
        train_examples: Objects with ``prompt`` and ``answer`` (and optionally ``meta["loss_spans"]``,
            see :func:`encode_training_example`).
        config: Hyper-parameters (defaults: :class:`SFTConfig`).
        dev_examples: Optional examples (``moa.data.Example``) for a dev accuracy.
        output_dir: Where rank 0 saves the PEFT adapter and ``train_metrics.json``.
        accelerator: Ignored (Trainer makes its own); kept for old callers.
        progress: Show Trainer's tqdm bar (rank 0 only).
        extra_metrics: Merged into the saved metrics (domain, base, ...).
        checkpoint_dir: Trainer's output folder: checkpoints (``checkpoint-N``) and TensorBoard
            runs (default :func:`checkpoint_folder` of ``output_dir``, else a temporary folder).
        resume: ``True``: continue from the newest checkpoint in ``checkpoint_dir`` (a fresh
            start if there is none); a path: from that checkpoint.
        callbacks: Extra ``transformers.TrainerCallback`` objects.

    Returns:
        The metrics and the output folder.
    """
    config = config or SFTConfig()
    if not train_examples:
        raise ValueError("train_adapter needs at least one training example.")
    if accelerator is not None:
        logger.warning("train_adapter: the accelerator argument is ignored (transformers.Trainer makes its own).")
    tokenizer = model.tokenizer
    ensure_pad_token(tokenizer)
    encoded = [encode_training_example(tokenizer, e, config.max_length) for e in train_examples]
    params = adapter_parameters(model, adapter_name)
    for p in params:
        p.requires_grad_(True)
    trainable, _ = report_trainable(model, f"adapter {adapter_name!r}")
    with tempfile.TemporaryDirectory(prefix="moa-train-") as scratch:
        folder = Path(checkpoint_dir or (checkpoint_folder(output_dir) if output_dir is not None else scratch))
        args = training_arguments(
            folder, steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=config.seed,
            gradient_accumulation_steps=config.gradient_accumulation_steps, weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm, optim=config.optim, save_steps=config.save_steps,
            save_total_limit=config.save_total_limit, logging_steps=config.logging_steps,
            report_to=config.report_to, gradient_checkpointing=config.gradient_checkpointing, progress=progress)
        world, rank = args.world_size, args.process_index
        order = unrolled_order(len(encoded), config.steps * config.gradient_accumulation_steps
                               * config.batch_size * world, config.seed)
        items = [{"input_ids": ids, "labels": labels} for ids, labels in encoded]
        # callbacks and a loss term the adapter's type may need (AdaLoRA's rank allocator)
        extension = adapter_training_extension(model, adapter_name, args)
        trainer = MixtureTrainer(
            model=model, args=args, train_dataset=OrderedDataset(items, order),
            data_collator=_collator(tokenizer.pad_token_id), lr_lambda=lr_lambda(config),
            forward_kwargs=lambda batch: {"adapter_names": [adapter_name] * len(batch["input_ids"]),
                                          "use_cache": False},
            save_hook=lambda path: model.save_adapter(adapter_name, path),
            callbacks=[*callbacks, *extension.callbacks],
            loss_terms=[extension.loss_term] if extension.loss_term is not None else [])
        start_from = (last_checkpoint(folder) if resume is True else str(resume)) if resume else None
        if resume and start_from is None:
            logger.warning("No checkpoint in %s: training from the start.", folder)
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=start_from)
        seconds = time.perf_counter() - start
        losses = list(trainer.step_losses)
    main = args.process_index == 0
    with _full_weights(trainer):  # FSDP: rank 0 holds the whole adapter inside this block
        fsdp = trainer.is_fsdp_enabled
        digests = ([weights_digest(params)] if main else []) if fsdp else _rank_digests(params)
    model.eval()
    if config.gradient_checkpointing:
        set_gradient_checkpointing(model, False)
    for p in params:
        p.requires_grad_(False)
    tail = losses[-min(10, len(losses)):] or [float("nan")]
    steps_run = len(losses)
    metrics: dict[str, Any] = {
        "adapter": adapter_name,
        "steps": config.steps,
        "trainer": "transformers.Trainer",
        "processes": world,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "global_batch": config.batch_size * config.gradient_accumulation_steps * world,
        "trainable_parameters": trainable,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(tail) / len(tail),
        "loss_curve": [round(x, 5) for x in losses],
        "resumed_from": start_from,
        "train_seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(1, steps_run), 3),
        "tokens_per_process": _tokens_of_rank([len(ids) for ids, _ in encoded], order, config.batch_size, world, rank),
        "train_examples": len(train_examples),
        "rank_weight_digests": digests,
        "config": dataclasses.asdict(config),
        **(extra_metrics or {}),
    }
    if dev_examples and config.dev_limit > 0 and main and not trainer.is_fsdp_enabled:
        metrics.update(dev_accuracy(model, adapter_name, list(dev_examples)[: config.dev_limit]))
    out_dir = Path(output_dir) if output_dir is not None else None
    with _full_weights(trainer):
        if out_dir is not None and main:
            save_adapter_with_metrics(model, adapter_name, out_dir, metrics, config.save_dtype)
    trainer.accelerator.wait_for_everyone()
    logger.info("Adapter %r: %d steps in %.1f s, final loss %.4f.", adapter_name, steps_run, seconds,
                metrics["final_loss"])
    return SFTResult(metrics=metrics, output_dir=out_dir)


def _rank_digests(params: Sequence[torch.Tensor]) -> list[str]:
    """Every rank's :func:`weights_digest` of the adapter (DDP: all equal)."""
    from accelerate.utils import gather_object

    return list(gather_object([weights_digest(params)]))


@contextlib.contextmanager
def _full_weights(trainer: Any) -> Iterator[None]:
    """Under FSDP (v1, ``use_orig_params``): the full adapter tensors on rank 0 inside the block."""
    if not trainer.is_fsdp_enabled:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(trainer.model_wrapped, writeback=False, rank0_only=True):
        yield


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
