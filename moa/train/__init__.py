"""Training on ``transformers.Trainer``: adapter SFT (LoRA / QLoRA) and the learned gate.

* :func:`moa.train.sft.train_adapter` -- SFT of one adapter, loss on the answer only.
* :func:`moa.train.router.train_router` -- the learned gate, on labels or the LM loss.
* :class:`moa.train.trainer.MixtureTrainer` -- the Trainer both run on (checkpoints of the
  trainable tensors only, fixed data order, moa's LR schedule).
* :mod:`moa.train.trl_compat` -- one adapter of a MixtureModel trained by TRL's ``SFTTrainer``.
* ``docs/training.md`` -- flags, resuming, DDP / FSDP / DeepSpeed, the TRL recipe.
* :mod:`moa.data.chat` -- how a request is formatted (shared with eval, serving and the demo).

Heavy modules load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SFTConfig": "moa.train.sft",
    "SFTResult": "moa.train.sft",
    "add_training_adapter": "moa.train.sft",
    "layer_target_regex": "moa.train.sft",
    "train_adapter": "moa.train.sft",
    "collect_features": "moa.train.router",
    "train_gate_lm": "moa.train.router",
    "train_gate_on_labels": "moa.train.router",
    "train_router": "moa.train.router",
    "MixtureTrainer": "moa.train.trainer",
    "MixtureSFTTrainer": "moa.train.trl_compat",
    "prepare_for_trl": "moa.train.trl_compat",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moa.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
