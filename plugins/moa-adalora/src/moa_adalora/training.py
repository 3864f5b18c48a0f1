"""Training an AdaLoRA adapter in moa: PEFT's rank allocator as a Trainer callback, plus its regulariser.

PEFT's ``AdaLoraModel`` asks its users to call ``update_and_allocate(global_step)`` after each
optimizer step and adds ``orth_reg_weight`` times an orthogonality penalty to the loss in its
forward. moa supplies both through its training extension point
(:mod:`moa.train.extensions`), so ``moa.train.train_adapter`` needs nothing AdaLoRA-specific:

* :class:`RankAllocationCallback` drives PEFT's own ``RankAllocator`` (sensitivity and
  uncertainty EMAs with ``beta1`` / ``beta2``, the cubic budget schedule over ``tinit``,
  ``tfinal``, ``deltaT``, ``total_step``, masking of ``E``) on moa's parameters, in
  ``on_optimizer_step``, while the step's gradients are still there; it repeats the three
  phases of ``AdaLoraModel.update_and_allocate``.
* :func:`orthogonality_penalty` is PEFT's regulariser: the mean over every ``A`` and ``B`` of
  ``||A A^T - I||_F`` / ``||B^T B - I||_F``.

The allocator finds parameters by PEFT's names (``<module>.lora_A.<adapter>``), so it is given
:class:`PeftParameterView`, moa's tensors under those names, and the ranks it chooses are the
``rank_pattern`` PEFT would write for the same gradients.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from moa.errors import AdapterConfigError, MissingDependencyError
from moa.train.extensions import TrainingExtension

from moa_adalora.config import PATTERN_SUFFIX, AdaLoraConfig
from moa_adalora.layer import AdaLoraLayer

logger = logging.getLogger(__name__)

#: The adapter name in the parameter names the allocator sees (PEFT's default adapter name).
PEFT_ADAPTER_NAME = "default"


def rank_allocator_class() -> type:
    """``peft.tuners.adalora.RankAllocator`` (public there), or a clear error without peft."""
    try:
        from peft.tuners.adalora import RankAllocator
    except ImportError as error:
        raise MissingDependencyError(
            f"Training an AdaLoRA adapter uses peft's RankAllocator, but peft did not import ({error}). "
            f"Install it with: pip install 'peft>=0.17'.") from error
    return RankAllocator


class PeftParameterView:
    """One adapter's moa parameters, named as in a PEFT model whose adapter is ``"default"``.

    ``named_parameters()`` yields ``("<module>.lora_A.default", A)``, then ``lora_B`` and
    ``lora_E``, module by module: the names ``RankAllocator`` looks for, and the keys of the
    ``rank_pattern`` it returns.

    Args:
        layers: Module name -> the adapter's :class:`AdaLoraLayer` there.
    """

    def __init__(self, layers: Mapping[str, AdaLoraLayer]):
        self.layers = dict(layers)

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """``(PEFT name, parameter)`` pairs (the parameters themselves, not copies)."""
        for module_name, layer in self.layers.items():
            for suffix in ("lora_A", "lora_B", "lora_E"):
                yield f"{module_name}.{suffix}.{PEFT_ADAPTER_NAME}", getattr(layer, suffix)


def orthogonality_penalty(layers: Mapping[str, AdaLoraLayer], weight: float) -> torch.Tensor:
    """``weight`` times the mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` over all modules (PEFT's).

    Args:
        layers: Module name -> :class:`AdaLoraLayer` of the adapter being trained.
        weight: ``orth_reg_weight``.

    Returns:
        A scalar tensor in the autograd graph of ``A`` and ``B``.
    """
    total: Any = 0
    count = 0
    for layer in layers.values():
        for param, left in ((layer.lora_A, True), (layer.lora_B, False)):
            covariance = param @ param.T if left else param.T @ param
            identity = torch.eye(*covariance.size(), out=torch.empty_like(covariance))
            total = total + torch.norm(covariance - identity, p="fro")
            count += 1
    return weight * (total / count if count else total)


class RankAllocationCallback(TrainerCallback):
    """Runs AdaLoRA's rank allocation after every optimizer step (``AdaLoraModel.update_and_allocate``).

    Before ``total_step - tfinal`` the sensitivities are updated and, every ``deltaT`` steps
    after ``tinit``, the ranks under budget are masked (``E`` rows set to 0); at
    ``total_step - tfinal`` the final allocation is forced; afterwards the final mask is
    re-applied after each step. Every new allocation is published to the adapter: the
    config's ``rank_pattern`` (PEFT's saved keys) and each layer's ``rank_mask``, so a save
    at any point writes PEFT's pruned form.

    Args:
        config: The adapter's config (its schedule fields are read live, as PEFT does).
        layers: Module name -> the adapter's :class:`AdaLoraLayer`, all at ``init_r``.
    """

    def __init__(self, config: AdaLoraConfig, layers: Mapping[str, AdaLoraLayer]):
        self.config = config
        self.layers = dict(layers)
        self.view = PeftParameterView(self.layers)
        self.allocator = rank_allocator_class()(self.view, config, PEFT_ADAPTER_NAME)
        self.pattern: dict[str, list[bool]] | None = None  # the allocator's, keys with the adapter name

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step > 0:
            if state.global_step <= self.config.total_step - self.config.tfinal:
                logger.warning("AdaLoRA: resumed at step %d, before the final allocation; the rank allocator's "
                               "sensitivity averages start afresh (they are not part of the checkpoint).",
                               state.global_step)
            elif self.pattern is None:
                # past the final allocation: the pruned rows are the ones whose E the masking zeroed
                self.publish({f"{name}.lora_E.{PEFT_ADAPTER_NAME}": (layer.lora_E.detach().view(-1) != 0).tolist()
                              for name, layer in self.layers.items()})

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.update_and_allocate(state.global_step)

    def update_and_allocate(self, global_step: int) -> None:
        """One step of PEFT's ``AdaLoraModel.update_and_allocate`` (gradients must be present).

        Args:
            global_step: Optimizer steps completed before this one (0 for the first).
        """
        config, view = self.config, self.view
        final_step = config.total_step - config.tfinal
        if global_step < final_step:
            _, pattern = self.allocator.update_and_allocate(view, global_step)
            if pattern:
                self.publish(pattern)
        elif global_step == final_step:
            if not self.allocator.exp_avg_ipt:  # resumed right here: no sensitivities yet, take this step's
                self.allocator.update_ipt(view)
            _, pattern = self.allocator.update_and_allocate(view, global_step, force_mask=True)
            self.publish(pattern)
            self.allocator.reset_ipt()
        elif self.pattern is not None:
            self.allocator.mask_using_rank_pattern(view, self.pattern)

    def publish(self, pattern: Mapping[str, list[bool]]) -> None:
        """Make ``pattern`` (the allocator's keys) the adapter's ``rank_pattern`` and layer masks."""
        self.pattern = {key: list(mask) for key, mask in pattern.items()}
        suffix = f".{PEFT_ADAPTER_NAME}"
        saved = {key.removesuffix(suffix): list(mask) for key, mask in self.pattern.items()}
        for module_name, layer in self.layers.items():
            layer.rank_mask = saved[module_name + PATTERN_SUFFIX]
        self.config.rank_pattern = saved
        logger.debug("AdaLoRA ranks now: %s", {k: sum(v) for k, v in saved.items()})


class KeepRanksCallback(TrainerCallback):
    """After each optimizer step, zero ``E`` on the rows a layer's ``rank_mask`` prunes.

    For an adapter whose ranks were already chosen but whose pruned rows are still in memory
    (trained again after an allocator run): the optimizer would otherwise revive them,
    while saving drops them.

    Args:
        layers: Module name -> the adapter's :class:`AdaLoraLayer`.
    """

    def __init__(self, layers: Mapping[str, AdaLoraLayer]):
        self.layers = dict(layers)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                if layer.rank_mask is not None:
                    keep = torch.tensor(layer.rank_mask, dtype=torch.bool, device=layer.lora_E.device)
                    layer.lora_E.masked_fill_(~keep[:, None], 0.0)


def check_allocator_settings(config: AdaLoraConfig, args: Any) -> None:
    """Refuse what PEFT's allocator cannot run: betas outside (0, 1), nothing to prune, sharded training.

    Raises:
        AdapterConfigError: With the offending value and what to change.
    """
    for key in ("beta1", "beta2"):
        value = getattr(config, key)
        if not 0 < value < 1:
            raise AdapterConfigError(f"AdaLoRA's rank allocator needs 0 < {key} < 1; got {key}={value!r}.")
    if config.target_r >= config.init_r:
        raise AdapterConfigError(
            f"AdaLoRA prunes from init_r={config.init_r} to target_r={config.target_r} ranks per module, so "
            f"target_r must be below init_r. Lower target_r, or train a LoRA adapter (moa.LoraConfig) for a "
            f"fixed rank.")
    sharded = [name for name in ("fsdp", "deepspeed") if getattr(args, name, None)]
    if sharded:
        raise AdapterConfigError(
            f"AdaLoRA's rank allocator needs every rank's full parameters and gradients, which {sharded[0]} "
            f"shards. Train AdaLoRA on one process or with DDP (accelerate launch without {sharded[0]}).")


def adalora_training_extension(config: AdaLoraConfig, *, model: Any, adapter_name: str, args: Any
                               ) -> TrainingExtension:
    """The callbacks and loss term that train ``adapter_name`` as PEFT's AdaLoRA does.

    A fresh adapter (no ``rank_pattern``) gets the rank allocator; an adapter already pruned
    (loaded from a folder with a ``rank_pattern``) keeps its ranks and is fine-tuned. Both
    get the orthogonality regulariser (unless ``orth_reg_weight`` is 0).

    Args:
        config: The adapter's :class:`AdaLoraConfig`.
        model: The :class:`~moa.MixtureModel` holding it.
        adapter_name: Its name in ``model``.
        args: The run's ``transformers.TrainingArguments``.

    Returns:
        A :class:`~moa.train.extensions.TrainingExtension`.

    Raises:
        AdapterConfigError: Settings the allocator cannot run with (:func:`check_allocator_settings`).
    """
    layers = model.adapter_layers(adapter_name)
    callbacks: list[Any] = []
    if config.rank_pattern:
        logger.warning("AdaLoRA adapter %r already has a rank_pattern (it was pruned): its ranks stay as they "
                       "are and training only fine-tunes them.", adapter_name)
        if any(layer.rank_mask is not None for layer in layers.values()):
            callbacks.append(KeepRanksCallback(layers))
    else:
        check_allocator_settings(config, args)
        max_steps = int(getattr(args, "max_steps", -1) or -1)
        if max_steps > 0 and max_steps != config.total_step:
            logger.warning("AdaLoRA adapter %r: the run has %d steps but its budget schedule spans total_step=%d; "
                           "set total_step to the number of steps to end on the final ranks.",
                           adapter_name, max_steps, config.total_step)
        callbacks.append(RankAllocationCallback(config, layers))
    loss_term = None
    if config.orth_reg_weight > 0:
        loss_term = functools.partial(orthogonality_penalty, layers, float(config.orth_reg_weight))
    return TrainingExtension(callbacks=callbacks, loss_term=loss_term)


__all__ = ["KeepRanksCallback", "PeftParameterView", "RankAllocationCallback", "adalora_training_extension",
           "check_allocator_settings", "orthogonality_penalty"]
