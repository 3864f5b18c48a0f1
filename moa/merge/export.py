"""Freezing a routed mixture into one static adapter (``moa.export_mixture``).

A router sends each request to a weighted mixture of adapters. Averaging those weights
over a set of prompts gives one mixture ``{adapter: weight}``; merging it (``cat``: exact
at the summed rank; ``svd``: truncated to a chosen rank) gives a single LoRA adapter that
applies that average mixture on every request. Saved in PEFT format, it needs neither moa
nor the router at deployment time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moa.errors import RoutingError
from moa.merge.adapters import merge_adapters
from moa.merge.strategies import MergeError

if TYPE_CHECKING:
    from moa.model.mixture_model import MixtureModel
    from moa.routing.router import Router

logger = logging.getLogger(__name__)

EXPORT_METHODS = ("cat", "svd")


@dataclass(frozen=True)
class ExportedMixture:
    """The result of :func:`export_mixture`.

    Attributes:
        adapter_name: The new adapter in the model's bank.
        weights: The static mixture it applies, ``{adapter: weight}``.
        method: ``"cat"`` or ``"svd"``.
        path: Where it was saved (PEFT format), or ``None``.
    """

    adapter_name: str
    weights: dict[str, float]
    method: str
    path: Path | None = None


def average_routing(model: MixtureModel, prompts: Sequence[str] | torch.Tensor) -> dict[str, float]:
    """The router's mixture per prompt (``model.route``), averaged over the prompts.

    A prompt's missing adapters count as weight 0; adapters whose average is 0 are dropped.

    Raises:
        RoutingError: No router set, or no prompts.
    """
    if isinstance(prompts, torch.Tensor):
        count = int(prompts.shape[0])
    else:
        prompts = list(prompts)
        count = len(prompts)
    if count == 0:
        raise RoutingError("export_mixture needs at least one prompt to average the routing over.")
    mixtures = model.route(prompts)
    total: dict[str, float] = {}
    for mixture in mixtures:
        for name, weight in (mixture or {}).items():
            total[name] = total.get(name, 0.0) + float(weight) / len(mixtures)
    return {name: weight for name, weight in total.items() if weight != 0.0}


def export_mixture(
    model: MixtureModel,
    weights: Mapping[str, float] | None = None,
    router: Router | None = None,
    prompts: Sequence[str] | torch.Tensor | None = None,
    method: str = "cat",
    rank: int | None = None,
    new_name: str = "mixture",
    save_to: str | os.PathLike | None = None,
    *,
    progress: bool = False,
) -> ExportedMixture:
    """Turn a routed (or given) mixture into one static LoRA adapter in the bank.

    Args:
        model: The MixtureModel holding the adapters.
        weights: The mixture ``{adapter: weight}``; if ``None``, it is the average routing
            decision over ``prompts``.
        router: Router to average (set temporarily); default: the model's router.
        prompts: Texts (the model needs its tokenizer) or token ids ``[B, S]``.
        method: ``"cat"`` (exact, rank = sum of the ranks) or ``"svd"`` (rank ``rank``).
        rank: Rank for ``"svd"`` (default: the sum of ranks, exact).
        new_name: Name of the new adapter.
        save_to: If given, save the adapter there in PEFT format.
        progress: Show a progress bar over modules.

    Returns:
        An :class:`ExportedMixture`.

    Raises:
        MergeError: Bad method, both/neither of weights and prompts.
        RoutingError: Prompts given but no router.

    Example::

        model.set_router(router)
        out = moa.export_mixture(model, prompts=calibration_prompts, method="svd", rank=16,
                                 new_name="static", save_to="adapters/static")
    """
    if method not in EXPORT_METHODS:
        raise MergeError(f"Unknown export method {method!r}. Choices: {', '.join(EXPORT_METHODS)}.")
    if method == "cat" and rank is not None:
        raise MergeError("method='cat' is exact at the summed rank; pass rank= only with method='svd'.")
    if (weights is None) == (prompts is None):
        raise MergeError("Give either weights={adapter: weight} or prompts= to average the router over (not both).")
    if weights is None:
        previous = model.router
        if router is not None:
            model.set_router(router)
        elif previous is None:
            raise RoutingError(
                "export_mixture with prompts needs a router: pass router=... or call model.set_router(router) first."
            )
        try:
            mixture = average_routing(model, prompts)
        finally:
            if router is not None:
                model.set_router(previous)
    else:
        mixture = {str(name): float(weight) for name, weight in weights.items()}
    mixture = {name: weight for name, weight in mixture.items() if weight != 0.0}
    if not mixture:
        raise MergeError("The mixture to export is empty (every weight is 0); nothing to freeze.")
    names = list(mixture)
    merge_adapters(
        model, names, [mixture[n] for n in names], strategy=method, new_name=new_name, rank=rank, progress=progress
    )
    path = None
    if save_to is not None:
        model.save_adapter(new_name, save_to)
        path = Path(save_to)
    logger.info("Exported mixture %s as adapter %r (%s)%s.", mixture, new_name, method, f" to {path}" if path else "")
    return ExportedMixture(adapter_name=new_name, weights=mixture, method=method, path=path)
