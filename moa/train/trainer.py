"""moa on :class:`transformers.Trainer`: what a MixtureModel (not a ``PreTrainedModel``) needs.

:class:`MixtureTrainer` is a plain ``Trainer`` with five changes:

* **checkpoints hold only the trainable tensors** (``trainable.safetensors``, by parameter
  name) plus whatever ``save_hook`` writes (the adapter's PEFT folder), next to Trainer's
  own ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth`` and ``trainer_state.json``;
  ``resume_from_checkpoint`` loads them back (the frozen NF4 base is never written);
* **the data order is fixed up front**: the dataset handed in is already in training order
  (see :func:`unrolled_order`), read sequentially; under DDP accelerate's batch sharding
  gives rank ``r`` the ``r``-th batch of each global batch, and a resumed run skips exactly
  the batches it had consumed;
* **an optional LR multiplier** (``lr_lambda``) replaces Trainer's schedulers (moa's
  warm-up + cosine to a floor, as the hand-written loop had);
* **extra forward arguments** per batch (``forward_kwargs``: the adapter to train);
* **the loss of every optimizer step** (the global token mean, all micro-batches and
  ranks) is recorded in :attr:`MixtureTrainer.step_losses`.

The loss is Trainer's: the model gets ``num_items_in_batch`` (MixtureModel passes it to
the transformers model), so a step's loss is the sum of the answer tokens' losses over the
whole accumulated (and, with ``average_tokens_across_devices``, all ranks') batch divided
by their count -- gradient accumulation 4 x batch 2 equals batch 8.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from moa import compat
from moa.errors import MoaError

logger = logging.getLogger(__name__)

TRAINABLE_NAME = "trainable.safetensors"
#: Optimizers that page their state to CPU memory through CUDA unified memory (bitsandbytes).
PAGED_OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit", "paged_adamw", "paged_lion_8bit", "paged_lion_32bit")


def check_optimizer(optim: str) -> None:
    """Refuse a paged optimizer without CUDA (bitsandbytes pages through CUDA unified memory).

    Raises:
        ValueError: ``optim`` is a paged optimizer and CUDA is not available.
    """
    if optim.startswith("paged_") and not torch.cuda.is_available():
        raise ValueError(
            f"--optim {optim} needs CUDA: bitsandbytes' paged optimizers page their state through "
            f"CUDA unified memory. On CPU use adamw_torch or adamw_bnb_8bit."
        )


def unrolled_order(n_examples: int, n_samples: int, seed: int) -> list[int]:
    """``n_samples`` example indices: permutations of ``range(n_examples)`` back to back.

    One ``torch.Generator`` seeded with ``seed`` draws every permutation, as the
    hand-written loop did, so a global batch may span two epochs.
    """
    generator = torch.Generator().manual_seed(int(seed))
    order: list[int] = []
    while len(order) < n_samples:
        order.extend(torch.randperm(n_examples, generator=generator).tolist())
    return order[:n_samples]


class OrderedDataset(torch.utils.data.Dataset):
    """``items[order[i]]`` at position ``i``: a dataset already in training order."""

    def __init__(self, items: Sequence[Any], order: Sequence[int]):
        self.items = items
        self.order = list(order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> Any:
        return self.items[self.order[index]]


def trainable_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Name -> tensor of ``model``'s parameters that require gradients (from ``state_dict`` if given).

    FSDP's wrapper prefixes are dropped from the names, as in its full state dict.
    """
    names = [name.replace("_fsdp_wrapped_module.", "") for name, p in model.named_parameters() if p.requires_grad]
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    return {name: source[name].detach().cpu().contiguous() for name in names if name in source}


class _StepLoss(TrainerCallback):
    """Moves the loss summed over a step's micro-batches into ``trainer.step_losses``."""

    def __init__(self, trainer: MixtureTrainer):
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        total = trainer.accelerator.reduce(trainer.pending_loss.to(trainer.args.device), reduction="mean")
        trainer.step_losses.append(float(total))
        trainer.pending_loss = torch.zeros(())


class TrainableCheckpoints:
    """Trainer mixin: checkpoints hold the trainable tensors (and ``save_hook``'s files), not the base.

    Mixed into :class:`MixtureTrainer` and :class:`moa.train.trl_compat.MixtureSFTTrainer`.
    """

    save_hook: Callable[[Path], None] | None = None

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable tensors (and :attr:`save_hook`'s files), never the frozen base."""
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if not self.args.should_save:
            return
        folder.mkdir(parents=True, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if self.save_hook is not None and state_dict is None:  # first: an adapter save replaces the folder
            # (under FSDP the module holds shards: only the gathered state dict is written)
            self.save_hook(folder)
        save_file(trainable_state(model, state_dict), str(folder / TRAINABLE_NAME), metadata={"format": "pt"})
        logger.info("Saved the trainable tensors to %s.", folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        """Load ``trainable.safetensors`` into the trainable parameters (all of them, same shapes)."""
        path = os.path.join(resume_from_checkpoint, TRAINABLE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{resume_from_checkpoint!r} is not a moa checkpoint: {TRAINABLE_NAME} is missing.")
        if self.is_fsdp_enabled:
            raise MoaError(f"Cannot resume {resume_from_checkpoint!r} under FSDP: moa's checkpoints hold the "
                           "adapter unsharded. Start the run again, or resume it under DDP (accelerate launch "
                           "without the FSDP config).")
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        tensors = load_file(path)
        params = {name: p for name, p in target.named_parameters() if p.requires_grad}
        if set(tensors) != set(params):
            raise ValueError(
                f"Checkpoint {resume_from_checkpoint!r} does not match the trainable parameters: missing "
                f"{sorted(set(params) - set(tensors))[:3]}, unexpected {sorted(set(tensors) - set(params))[:3]}."
            )
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(tensors[name].to(param.device, param.dtype))
        logger.info("Resumed %d trainable tensors from %s.", len(params), resume_from_checkpoint)



class MixtureTrainer(TrainableCheckpoints, Trainer):
    """``transformers.Trainer`` for moa models; see the module docstring.

    Args:
        *args: As for ``Trainer``.
        lr_lambda: LR multiplier of the optimizer step (``None``: Trainer's scheduler).
        forward_kwargs: Batch -> extra keyword arguments of the model's forward.
        save_hook: Called with each checkpoint folder on the main process (e.g. to write the
            adapter's PEFT folder there).
        loss_terms: Callables returning scalar tensors added to the training loss, each
            counted once per optimizer step (an adapter type's
            :class:`~moa.train.extensions.TrainingExtension`).
        **kwargs: As for ``Trainer``.
    """

    def __init__(
        self,
        *args: Any,
        lr_lambda: Callable[[int], float] | None = None,
        forward_kwargs: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        save_hook: Callable[[Path], None] | None = None,
        loss_terms: Sequence[Callable[[], torch.Tensor]] = (),
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.lr_lambda = lr_lambda
        self.forward_kwargs = forward_kwargs
        self.save_hook = save_hook
        self.loss_terms = list(loss_terms)
        self.step_losses: list[float] = []
        self.pending_loss = torch.zeros(())
        self.add_callback(_StepLoss(self))
        if self.args.disable_tqdm:  # quiet means quiet: no printed log dicts either
            self.remove_callback(PrinterCallback)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        """The dataset is already in training order: read it sequentially."""
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        """``LambdaLR(lr_lambda)`` when given, else Trainer's scheduler."""
        if self.lr_lambda is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.lr_lambda)
        return self.lr_scheduler

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """Trainer's loss, with :attr:`forward_kwargs` added to the inputs and :attr:`loss_terms` to the loss."""
        if self.forward_kwargs is not None:
            inputs = {**inputs, **self.forward_kwargs(inputs)}
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not self.loss_terms or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        extra = sum(term() for term in self.loss_terms)
        # Trainer divides a micro-batch's loss by the accumulation steps itself unless the loss
        # is already normalised over the whole accumulated batch (num_items_in_batch); either
        # way each term must count once per optimizer step.
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # Trainer's own rule (transformers.Trainer.training_step)
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None)
        if scaled:
            extra = extra / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        loss = loss + extra.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Trainer's step; the micro-batch's share of the step loss is kept for :attr:`step_losses`."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.pending_loss = self.pending_loss + loss.detach().float().cpu()
        return loss


def report_trainable(model: Any, label: str) -> tuple[int, int]:
    """Log ``trainable params: N || all params: M || trainable%: P`` (PEFT's report) and return ``(N, M)``."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s: trainable params: %s || all params: %s || trainable%%: %.4f", label, f"{trainable:,d}",
                f"{total:,d}", 100 * trainable / max(total, 1))
    return trainable, total


def last_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder in ``folder`` (``None`` if there is none)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if Path(folder).is_dir() else None


def training_arguments(
    output_dir: str | os.PathLike,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    gradient_accumulation_steps: int = 1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    optim: str = "adamw_torch",
    save_steps: int = 0,
    save_total_limit: int | None = None,
    logging_steps: int = 10,
    report_to: str = "none",
    gradient_checkpointing: bool = False,
    progress: bool = True,
) -> Any:
    """``TrainingArguments`` for a moa run (CPU when there is no CUDA, fp32, no column pruning).

    Raises:
        ValueError: A paged optimizer without CUDA (see :func:`check_optimizer`).
    """
    from transformers import TrainingArguments

    check_optimizer(optim)
    reports = [r.strip() for r in str(report_to).split(",") if r.strip() and r.strip() != "none"]
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=int(steps),
        per_device_train_batch_size=int(batch_size),
        gradient_accumulation_steps=int(gradient_accumulation_steps),
        learning_rate=float(lr),
        weight_decay=float(weight_decay),
        max_grad_norm=float(max_grad_norm),
        optim=optim,
        seed=int(seed),
        save_strategy="steps" if save_steps else "no",
        save_steps=int(save_steps) or 500,
        save_total_limit=save_total_limit,
        logging_steps=max(1, int(logging_steps)),
        report_to=reports or "none",
        **compat.checkpointing_argument(bool(gradient_checkpointing)),
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        dataloader_pin_memory=False,
        average_tokens_across_devices=True,
        ddp_find_unused_parameters=False,
    )
