"""What trainers call on a model besides ``forward``: parameter counts and activation checkpointing.

transformers' ``Trainer`` and TRL's trainers call these methods on any model they train
(PEFT's model has them too); :class:`TrainerSupport` gives them to
:class:`~moa.model.MixtureModel`, which provides ``base_model`` and ``parameters()``.
"""

from __future__ import annotations

import logging
from typing import Any

from moa.errors import RoutingError
from moa.model.call_routing import checkpoint_contexts

logger = logging.getLogger("moa.model.mixture_model")  # the model's log, where users look for it


class TrainerSupport:
    """Mixin: PEFT's parameter counts and transformers' checkpointing switches for a model with ``base_model``."""

    base_model: Any

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts; 4-bit weights count as their unpacked size."""
        trainable = total = 0
        for param in self.parameters():
            count = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
            total += count
            trainable += count if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Log the trainable parameter count, like PEFT's method of the same name."""
        trainable, total = self.get_nb_trainable_parameters()
        message = (
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )
        logger.info(message)
        print(message)  # noqa: T201 - PEFT's method prints; users call it for this output

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        """Recompute the base's decoder layers in the backward pass (non-reentrant), as
        transformers' method of the same name (``Trainer(gradient_checkpointing=True)`` calls it).

        The recomputation runs outside this call, so moa hands it the call's routing frame
        (:func:`~moa.model.call_routing.checkpoint_contexts`): the recomputed adapters see the
        same routing, whatever other threads do meanwhile.
        """
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            raise RoutingError(
                "moa supports non-reentrant checkpointing only (use_reentrant=False): reentrant "
                "recomputation cannot see the call's routing. Drop use_reentrant=True."
            )
        kwargs.setdefault("context_fn", checkpoint_contexts)
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        """transformers >= 5.2x's name of :meth:`gradient_checkpointing_enable` (what its Trainer calls,
        with ``every_n_layers`` / ``offload`` in ``options``)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **options)

    def gradient_checkpointing_disable(self) -> None:
        """Turn :meth:`gradient_checkpointing_enable` off."""
        base = self.base_model
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()

    activation_checkpointing_disable = gradient_checkpointing_disable


__all__ = ["TrainerSupport"]
