"""Training: adapter SFT (LoRA / QLoRA, single process or DDP) and the learned gate.

* :func:`moa.train.sft.train_adapter` -- SFT of one adapter, loss on the answer only.
* :func:`moa.train.router.train_router` -- the learned gate, on labels or the LM loss.
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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moa.train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
