"""Training one adapter of a MixtureModel with TRL's ``SFTTrainer`` (for users with a TRL script).

TRL >= 1.x patches ``model.forward`` with a *fused LM head* that reads ``model.base_model`` as
the transformers backbone. On a PEFT model it patches ``model.get_base_model()`` instead;
a MixtureModel is not a ``PeftModel``, so TRL patches the MixtureModel itself, where
``base_model`` is the whole causal LM and the patched forward would skip moa's routing.
:func:`route_fused_head_inside` moves the patch to where PEFT gets it: onto the transformers
model inside, which ``MixtureModel.forward`` calls with the adapters routed.

Recipe (``docs/training.md``)::

    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    model.load_adapter("adapters/sql", adapter_name="sql")          # stays frozen
    add_training_adapter(model, "mine", rank=16)
    prepare_for_trl(model, "mine")                                  # only "mine" trains, and is active
    trainer = MixtureSFTTrainer(model=model, adapter_name="mine", args=trl.SFTConfig(...),
                                train_dataset=data, processing_class=model.tokenizer)
    trainer.train()
    model.save_adapter("mine", "adapters/mine")                     # PEFT folder

With TRL's own ``SFTTrainer`` class, call ``route_fused_head_inside(trainer.model)`` after
building it (and keep ``save_strategy="no"``: its checkpoints would hold the whole base).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trl import SFTTrainer

from moa.train.sft import adapter_parameters
from moa.train.trainer import TrainableCheckpoints, report_trainable

logger = logging.getLogger(__name__)

#: The per-token outputs TRL's SFTTrainer asks of its fused head (loss, entropy, accuracy).
FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


def prepare_for_trl(model: Any, adapter_name: str) -> tuple[int, int]:
    """Make ``adapter_name`` the only trainable tensors of ``model`` and its active adapter.

    Every other adapter stays loaded and frozen. Returns ``(trainable, all)`` parameter
    counts (also logged).
    """
    for name in model.adapter_names:
        trainable = name == adapter_name
        for param in adapter_parameters(model, name):
            param.requires_grad_(trainable)
    model.set_adapter(adapter_name)
    return report_trainable(model, f"adapter {adapter_name!r} (TRL)")


def route_fused_head_inside(model: Any) -> None:
    """Move TRL's fused LM head from the MixtureModel onto the transformers model inside it.

    Idempotent; a no-op when TRL did not patch ``model`` (older TRL, or already moved).
    """
    from trl.trainer.utils import add_fused_lm_head

    if "forward" not in vars(model):
        return
    del vars(model)["forward"]  # back to MixtureModel.forward (the routing)
    inner = model.get_base_model()
    if "forward" not in vars(inner):
        add_fused_lm_head(inner, outputs=FUSED_OUTPUTS)
    logger.info("TRL's fused LM head now runs inside the MixtureModel's routed forward.")


class MixtureSFTTrainer(TrainableCheckpoints, SFTTrainer):
    """TRL's ``SFTTrainer`` for one adapter of a MixtureModel.

    Checkpoints (and ``save_model``) hold the adapter's PEFT folder and its trainable tensors,
    with Trainer's optimizer, scheduler and RNG state, so ``train(resume_from_checkpoint=...)``
    works; the frozen base is never written.

    Args:
        *args: As for ``trl.SFTTrainer``.
        adapter_name: The adapter being trained (saved into each checkpoint).
        **kwargs: As for ``trl.SFTTrainer``.
    """

    def __init__(self, *args: Any, adapter_name: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        route_fused_head_inside(self.model)
        model = self.model
        self.save_hook: Callable[[Path], None] | None = lambda folder: model.save_adapter(adapter_name, folder)
