"""What an adapter type may add to its adapters' training: Trainer callbacks and a loss term.

Most adapter types train by plain gradient descent on their parameters. Some need more:
AdaLoRA (the ``moa-adalora`` plugin) prunes ranks with an allocator after every optimizer step
and adds an orthogonality regulariser to the loss. Such a type says so on its config class,
with one optional method::

    class MyConfig(AdapterConfig):
        def training_extension(self, *, model, adapter_name, args) -> TrainingExtension | None:
            return TrainingExtension(callbacks=[MyCallback(model, adapter_name)],
                                     loss_term=lambda: 0.1 * my_penalty(model, adapter_name))

:func:`moa.train.sft.train_adapter` calls it once, before training, with the
:class:`~moa.MixtureModel`, the adapter being trained and the run's
``transformers.TrainingArguments``; the callbacks join the Trainer's and the loss term is
added to the training loss (see :class:`TrainingExtension`). Types without the method train
as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moa.errors import AdapterConfigError

#: The optional config-class method an adapter type implements to extend training.
EXTENSION_METHOD = "training_extension"


@dataclasses.dataclass(frozen=True)
class TrainingExtension:
    """Additions to the training run of one adapter.

    Attributes:
        callbacks: ``transformers.TrainerCallback`` objects added to the Trainer (e.g. one
            acting in ``on_optimizer_step``, when the step's gradients are still there).
        loss_term: Called once per micro-batch, after the model's loss; returns a scalar
            tensor added to the training loss so that it counts once per optimizer step
            (divided by the gradient accumulation steps where the loss is summed over
            micro-batches). Not added to evaluation losses.
    """

    callbacks: Sequence[Any] = ()
    loss_term: Callable[[], torch.Tensor] | None = None


def adapter_training_extension(model: Any, adapter_name: str, args: Any) -> TrainingExtension:
    """The :class:`TrainingExtension` the adapter's type asks for (empty when it asks for none).

    Args:
        model: The :class:`~moa.MixtureModel` holding the adapter.
        adapter_name: The adapter about to be trained.
        args: The run's ``transformers.TrainingArguments``.

    Returns:
        What the config's ``training_extension`` method returned, or an empty extension.

    Raises:
        AdapterConfigError: The method returned something other than a
            :class:`TrainingExtension` or ``None``.
    """
    config = model.peft_config[adapter_name]
    method = getattr(config, EXTENSION_METHOD, None)
    if not callable(method):
        return TrainingExtension()
    extension = method(model=model, adapter_name=adapter_name, args=args)
    if extension is None:
        return TrainingExtension()
    if not isinstance(extension, TrainingExtension):
        raise AdapterConfigError(
            f"{type(config).__name__}.{EXTENSION_METHOD}() returned {type(extension).__name__}; it must return "
            f"a moa.train.extensions.TrainingExtension or None. Fix the adapter type's plugin.")
    return extension


__all__ = ["EXTENSION_METHOD", "TrainingExtension", "adapter_training_extension"]
