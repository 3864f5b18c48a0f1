"""The recipe of the shipped demo adapters and gate, and helpers to train by domain name.

``examples/train_demo_adapters.py``, ``moa train-adapter --domain ...`` and
``moa demo --retrain`` all go through :func:`train_domain_adapter` with
:data:`DEMO_RECIPE`, so the shipped adapters can be reproduced exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa.train.sft import ALL_PROJECTIONS, SFTConfig, SFTResult, add_training_adapter, train_adapter

logger = logging.getLogger(__name__)

#: The gate reads the input of this decoder layer; adapters live on layers >= it.
DEFAULT_HIDDEN_LAYER = 2


@dataclasses.dataclass(frozen=True)
class AdapterRecipe:
    """How a demo adapter is trained.

    Attributes:
        rank: LoRA rank.
        alpha: LoRA alpha (scale = alpha / rank).
        projections: Target projections (of layers ``first_layer..``).
        first_layer: First decoder layer that carries the adapter (= the gate's layer).
        dropout: LoRA dropout.
        steps: Optimizer steps per domain (overrides in ``steps_per_domain``).
        steps_per_domain: Domain -> steps.
        batch_size: Examples per step.
        lr: Peak learning rate.
        seed: Seed of the initialisation and data order.
        quantization: Base quantization while training (``"nf4"`` = QLoRA, ``None`` = fp32).
    """

    rank: int = 8
    alpha: float = 16.0
    projections: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    first_layer: int = DEFAULT_HIDDEN_LAYER
    dropout: float = 0.05
    steps: int = 120
    steps_per_domain: tuple[tuple[str, int], ...] = (
        ("sql", 80), ("arithmetic", 600), ("icd", 120), ("french", 400), ("code", 100),
    )
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    quantization: str | None = "nf4"

    def steps_for(self, domain: str) -> int:
        """Steps for ``domain``."""
        return dict(self.steps_per_domain).get(domain, self.steps)


DEMO_RECIPE = AdapterRecipe()


def load_jsonl_examples(path: str | os.PathLike, domain: str = "custom") -> list[Any]:
    """Examples from a JSONL file with ``prompt`` and ``answer`` (and optional ``domain``) per line."""
    from moa.data.common import Example

    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        out.append(Example(id=str(row.get("id", f"{domain}-{i}")), domain=str(row.get("domain", domain)),
                           prompt=str(row["prompt"]), answer=str(row["answer"]),
                           phrasing=int(row.get("phrasing", 0)), split=str(row.get("split", "train")),
                           meta=dict(row.get("meta", {}))))
    return out


def train_domain_adapter(
    model: Any,
    domain: str,
    output_dir: str | os.PathLike | None,
    recipe: AdapterRecipe = DEMO_RECIPE,
    steps: int | None = None,
    train_examples: Sequence[Any] | None = None,
    dev_examples: Sequence[Any] | None = None,
    gradient_checkpointing: bool = False,
    accelerator: Any = None,
    progress: bool = True,
    adapter_name: str | None = None,
    dev_limit: int = 64,
    config_overrides: Mapping[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool | str = False,
    callbacks: Sequence[Any] = (),
) -> SFTResult:
    """Add a fresh adapter for ``domain`` to ``model`` and train it with ``recipe``.

    Args:
        model: A :class:`moa.MixtureModel`.
        domain: A built-in domain (its train/dev splits are used unless given).
        output_dir: Where to save the adapter (``None``: do not save).
        recipe: Hyper-parameters (:data:`DEMO_RECIPE` reproduces the shipped adapters).
        steps: Overrides the recipe's steps.
        train_examples: Overrides the domain's train split.
        dev_examples: Overrides the domain's dev split.
        gradient_checkpointing: Recompute activations in the backward pass.
        accelerator: An ``accelerate.Accelerator`` (made if ``None``).
        progress: Progress bar.
        adapter_name: Name in the model (default: the domain).
        dev_limit: Dev examples generated for the saved dev accuracy.
        config_overrides: :class:`~moa.train.sft.SFTConfig` fields to change (``optim``,
            ``gradient_accumulation_steps``, ``save_steps``, ``report_to``...).
        checkpoint_dir: Trainer's checkpoint folder (default ``<output_dir>-checkpoints``).
        resume: Continue from the newest checkpoint (``True``) or from this one (a path).
        callbacks: Extra ``transformers.TrainerCallback`` objects.
    """
    if train_examples is None or dev_examples is None:
        from moa.data import load_split

        train_examples = train_examples if train_examples is not None else load_split(domain, "train")
        dev_examples = dev_examples if dev_examples is not None else load_split(domain, "dev")
    name = adapter_name or domain
    add_training_adapter(model, name, rank=recipe.rank, alpha=recipe.alpha, first_layer=recipe.first_layer,
                         projections=recipe.projections, dropout=recipe.dropout, seed=recipe.seed)
    config = SFTConfig(steps=steps or recipe.steps_for(domain), batch_size=recipe.batch_size, lr=recipe.lr,
                       seed=recipe.seed, gradient_checkpointing=gradient_checkpointing, dev_limit=dev_limit)
    config = dataclasses.replace(config, **dict(config_overrides or {}))
    extra = {"domain": domain, "recipe": dataclasses.asdict(recipe),
             "quantization": _quantization_of(model), "base_fingerprint": model.base_fingerprint}
    return train_adapter(model, name, train_examples, config, dev_examples=dev_examples, output_dir=output_dir,
                         accelerator=accelerator, progress=progress, extra_metrics=extra,
                         checkpoint_dir=checkpoint_dir, resume=resume, callbacks=callbacks)


def _quantization_of(model: Any) -> str | None:
    from moa.model.base_loading import detect_quantization

    return detect_quantization(model.base_model)


__all__ = ["ALL_PROJECTIONS", "DEFAULT_HIDDEN_LAYER", "DEMO_RECIPE", "AdapterRecipe", "load_jsonl_examples",
           "train_domain_adapter"]
