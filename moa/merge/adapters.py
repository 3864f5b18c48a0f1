"""Merging adapters into a new adapter of the model's bank (``moa.merge_adapters``)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moa.errors import MoaError, format_choices
from moa.merge.strategies import BUILTIN_STRATEGIES, MAJORITY_SIGN_METHODS, MergeError

if TYPE_CHECKING:
    from moa.adapters.lora import LoraConfig, LoraLayer
    from moa.model.mixture_model import MixtureModel

logger = logging.getLogger(__name__)

StrategyFunction = Callable[..., tuple[Tensor, Tensor]]

#: Built-in strategies that are exact only at full rank ``min(in, out)`` by default.
_FULL_RANK = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge_adapters(
    model: MixtureModel,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    strategy: str | StrategyFunction = "linear",
    new_name: str = "merged",
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int = 0,
    progress: bool = False,
) -> str:
    """Merge loaded adapters into a new LoRA adapter ``new_name`` in the model's bank.

    The strategy (see :mod:`moa.merge.strategies`) runs once per target module on the
    adapters present there, with ``weights[i] * scale_i`` as the weight of adapter ``i``.
    The result is a plain LoRA (``use_rslora=False``, ``lora_alpha == r`` per module, so its
    scale is 1; modules of another rank are listed in ``rank_pattern``/``alpha_pattern``),
    so ``model.save_adapter(new_name, dir)`` writes a folder PEFT loads.

    Everything is computed and checked before the model changes: on any error the bank
    is exactly as it was.

    Args:
        model: The :class:`~moa.MixtureModel` holding the adapters.
        names: Adapters to merge (at least one, no repeats).
        weights: One finite weight per adapter (negative subtracts); ``None`` = ``1/n`` each.
        strategy: A registered strategy name (``moa plugins`` lists them) or a function with
            the strategy signature.
        new_name: Name of the merged adapter (must be new).
        rank: Rank of the result (``None``: the strategy's default, e.g. the sum of ranks).
        density: Fraction kept by ``ties``/``dare_*``/``magnitude_prune*`` (required there).
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES sign election).
        seed: Seed of the CPU generator used by random strategies (DARE).
        progress: Show a progress bar over modules.

    Returns:
        ``new_name``.

    Raises:
        UnknownAdapterError: A name is not loaded.
        AdapterExistsError: ``new_name`` is taken or invalid.
        UnknownPluginError: No strategy of that name is registered.
        MergeError: Bad weights, options, non-low-rank adapters, or a strategy that fails.
        AdapterShapeError: The result's rank is above ``model.max_rank``.

    Example::

        moa.merge_adapters(model, ["code", "math"], [0.5, 0.5], "ties", "both", density=0.2)
        model.save_adapter("both", "adapters/both")
    """
    names = _check_names(model, names)
    model.bank.check_new_name(new_name)
    weight_list = _check_weights(names, weights)
    function, label = _resolve_strategy(strategy)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise MergeError(f"rank must be a positive integer or None; got {rank!r}.")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise MergeError(
            f"Unknown majority_sign_method {majority_sign_method!r}. Choices: {', '.join(MAJORITY_SIGN_METHODS)}."
        )
    factors = _low_rank_factors(model, names)
    modules = [layer.module_name for layer in model.mixture_layers() if any(layer.module_name in f for f in factors.values())]
    _precheck_rank(model, label, rank, factors, modules)
    generator = torch.Generator().manual_seed(int(seed))
    merged: dict[str, tuple[Tensor, Tensor]] = {}
    for module_name in _progress(modules, progress, f"merge ({label})"):
        present = [(n, w) for n, w in zip(names, weight_list) if module_name in factors[n]]
        lora_a = [factors[n][module_name][0] for n, _ in present]
        lora_b = [factors[n][module_name][1] for n, _ in present]
        scaled = [w * factors[n][module_name][2] for n, w in present]
        merged[module_name] = _run_strategy(
            function, label, module_name, [n for n, _ in present], lora_a, lora_b, scaled,
            rank=rank, density=density, majority_sign_method=majority_sign_method, generator=generator,
        )
    template = model.peft_config[names[0]]
    config, layers = build_lora_adapter(model, merged, getattr(template, "base_model_name_or_path", None))
    model.install_adapter(new_name, config, layers, trainable=False)
    logger.info(
        "Merged %s with weights %s by %r into adapter %r (ranks %s).",
        names, weight_list, label, new_name, sorted({a.shape[0] for a, _ in merged.values()}),
    )
    return new_name


def build_lora_adapter(
    model: MixtureModel, factors: Mapping[str, tuple[Tensor, Tensor]], base_model_name_or_path: str | None = None
) -> tuple[LoraConfig, dict[str, LoraLayer]]:
    """A LoRA config and layers (scale 1 everywhere) holding ``{module: (A, B)}``.

    The most common rank is ``r`` (= ``lora_alpha``); other modules' ranks go into
    ``rank_pattern`` and ``alpha_pattern`` under their full module name, which PEFT and
    moa match exactly. ``use_rslora`` is off, so the scale is ``alpha / r = 1``.
    """
    from moa.adapters.lora import LoraConfig, LoraLayer
    from moa.model.targets import module_suffixes, resolve_target_modules

    ranks = {m: int(a.shape[0]) for m, (a, _) in factors.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda value: (counts[value], value))
    pattern = {m: rank for m, rank in ranks.items() if rank != r}
    suffixes = module_suffixes(sorted(factors))
    targets = suffixes if resolve_target_modules(model.base_model, suffixes) == sorted(factors) else sorted(factors)
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        use_rslora=False,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        target_modules=targets,
        base_model_name_or_path=base_model_name_or_path,
    )
    config.validate()
    layers: dict[str, LoraLayer] = {}
    for module_name, (a, b) in factors.items():
        layer = LoraLayer(config, module_name, int(a.shape[1]), int(b.shape[0]))
        if layer.rank != a.shape[0] or layer.scale != 1.0:
            raise MergeError(
                f"Internal error: module {module_name!r} got rank {layer.rank} / scale {layer.scale} "
                f"from the merged config, expected {a.shape[0]} / 1.0."
            )
        layer.to(dtype=a.dtype)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        layers[module_name] = layer
    return config, layers


# --- checks ------------------------------------------------------------------------------


def _check_names(model: MixtureModel, names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise MergeError(
            f"names must be a non-empty list of adapter names, got {names!r}. "
            f"Loaded: {format_choices(model.adapter_names)}."
        )
    repeated = sorted(n for n, count in Counter(names).items() if count > 1)
    if repeated:
        raise MergeError(f"Adapters {repeated} are listed more than once; give each once with its weight.")
    model.bank.check_known(list(names))
    return list(names)


def _check_weights(names: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0 / len(names)] * len(names)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(names):
        raise MergeError(
            f"weights must be a list with one number per adapter ({len(names)} for {list(names)}); "
            f"got {weights!r}."
        )
    values = []
    for name, weight in zip(names, weights):
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise MergeError(f"Weight {weight!r} of adapter {name!r} is not a finite number.")
        values.append(value)
    return values


def _resolve_strategy(strategy: str | StrategyFunction) -> tuple[StrategyFunction, str]:
    if callable(strategy):
        return strategy, getattr(strategy, "__name__", "custom")
    if not isinstance(strategy, str):
        raise MergeError(f"strategy must be a name or a function, got {type(strategy).__name__}.")
    from moa.plugin import get_merge_strategy

    return get_merge_strategy(strategy).function, strategy


def _low_rank_factors(model: MixtureModel, names: Sequence[str]) -> dict[str, dict[str, tuple[Tensor, Tensor, float]]]:
    factors: dict[str, dict[str, tuple[Tensor, Tensor, float]]] = {}
    for name in names:
        factors[name] = {}
        for module_name, layer in model.adapter_layers(name).items():
            low_rank = layer.low_rank()
            if low_rank is None:
                raise MergeError(
                    f"Adapter {name!r} ({type(layer).__name__} on {module_name!r}) is not low rank, so it "
                    f"cannot be merged into a LoRA adapter. Merge only LoRA-like adapters."
                )
            a, b, scale = low_rank
            factors[name][module_name] = (a.detach().float(), b.detach().float(), float(scale))
    return factors


def _precheck_rank(
    model: MixtureModel, label: str, rank: int | None, factors: Mapping[str, Mapping], modules: Sequence[str]
) -> None:
    """Fail before any work when a built-in strategy's result would exceed ``max_rank``."""
    if label not in BUILTIN_STRATEGIES:
        return
    worst, where = 0, ""
    for module_name in modules:
        present = [f[module_name] for f in factors.values() if module_name in f]
        out_f, in_f = present[0][1].shape[0], present[0][0].shape[1]
        total = sum(a.shape[0] for a, _, _ in present)
        if label == "cat":
            expected = total
        elif label == "linear_factors":
            expected = present[0][0].shape[0]
        elif rank is not None:
            expected = rank
        elif label in _FULL_RANK:
            expected = min(in_f, out_f)
        else:
            expected = min(total, in_f, out_f)
        if expected > worst:
            worst, where = expected, module_name
    if worst > model.max_rank:
        hint = f"use '{label}_svd' with rank=..." if label in _FULL_RANK else "pass a smaller rank=..."
        raise MergeError(
            f"Strategy {label!r} would give rank {worst} on {where!r}, above this model's max_rank="
            f"{model.max_rank}. {hint[0].upper()}{hint[1:]}, use 'svd', or load the model with a larger max_rank."
        )


def _run_strategy(
    function: StrategyFunction,
    label: str,
    module_name: str,
    present: Sequence[str],
    lora_a: Sequence[Tensor],
    lora_b: Sequence[Tensor],
    scaled: Sequence[float],
    **options: object,
) -> tuple[Tensor, Tensor]:
    try:
        result = function(lora_a, lora_b, scaled, **options)
    except MoaError as error:
        raise MergeError(f"Strategy {label!r} failed on {module_name!r} (adapters {list(present)}): {error}") from error
    except Exception as error:  # a plugin strategy may raise anything
        raise MergeError(
            f"Strategy {label!r} raised {type(error).__name__} on {module_name!r} (adapters "
            f"{list(present)}): {error}"
        ) from error
    in_f, out_f = lora_a[0].shape[1], lora_b[0].shape[0]
    ok = isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, Tensor) for t in result)
    if ok:
        a, b = result
        ok = a.dim() == 2 and b.dim() == 2 and a.shape[1] == in_f and b.shape[0] == out_f and a.shape[0] == b.shape[1]
    if not ok:
        raise MergeError(
            f"Strategy {label!r} must return (A [r, {in_f}], B [{out_f}, r]) on {module_name!r}; got "
            f"{[tuple(t.shape) for t in result] if isinstance(result, tuple) else type(result).__name__}."
        )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise MergeError(f"Strategy {label!r} produced NaN or infinite values on {module_name!r}.")
    return a.detach().float(), b.detach().float()


def _progress(items: Sequence[str], enabled: bool, description: str) -> Sequence[str]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="module")
