"""Which modules of a base an adapter targets, and how their linear shapes are read."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence

from torch import nn

from moa.errors import MissingDependencyError, TargetModuleError, format_choices

logger = logging.getLogger(__name__)

#: Output heads never targeted by ``"all-linear"`` (PEFT excludes the output layer too).
OUTPUT_LAYER_NAMES = ("lm_head", "embed_out", "output", "score", "classifier")


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return linear4bit is not None and isinstance(module, linear4bit)


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer an adapter can wrap (dense or bitsandbytes)."""
    return isinstance(module, nn.Linear) or is_quantized_linear(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear``, ``Linear4bit`` or a wrapper's ``base_layer``.

    Raises:
        TargetModuleError: ``module`` is not a linear layer.
    """
    if isinstance(module, nn.Linear):  # Linear4bit subclasses nn.Linear, keeps logical sizes
        return int(module.in_features), int(module.out_features)
    inner = getattr(module, "base_layer", None)
    if isinstance(inner, nn.Module):
        return linear_features(inner)
    raise TargetModuleError(
        f"Module of type {type(module).__name__} is not a linear layer; moa adapts nn.Linear and "
        "bitsandbytes Linear4bit. Check target_modules (print the model to see its Linear names)."
    )


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer of ``model`` that is not inside a moa wrapper."""
    names = []
    for name, module in model.named_modules():
        if is_linear(module) and ".base_layer" not in f".{name}" and ".adapters." not in f".{name}.":
            names.append(name)
    return names


def _strip_wrapper(name: str) -> str:
    return name.replace(".base_layer", "")


def peft_default_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's default LoRA ``target_modules`` for ``model``'s architecture (``config.model_type``).

    What ``peft.LoraConfig(target_modules=None)`` picks: PEFT's
    ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model.config.model_type]``, e.g.
    ``["q_proj", "v_proj"]`` for ``llama``. A few architectures map to a regex (a string).

    Args:
        model: A transformers model (its ``config.model_type`` is looked up).

    Returns:
        The module suffixes (a new list), or PEFT's regex string.

    Raises:
        TargetModuleError: ``model`` has no ``config.model_type``, or PEFT's table has no
            entry for it; pass ``target_modules`` explicitly then.
        MissingDependencyError: ``peft`` is not installed.
    """
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults
    except ImportError as error:
        raise MissingDependencyError(
            f"target_modules=None picks PEFT's default target modules, but 'peft' did not import ({error}). "
            f"Install it with: pip install 'peft>=0.17', or pass target_modules explicitly."
        ) from error
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    defaults = peft_defaults.get(model_type) if isinstance(model_type, str) else None
    if defaults is None:
        suffixes = module_suffixes([_strip_wrapper(n) for n in linear_module_names(model)])
        raise TargetModuleError(
            f"target_modules=None asks for PEFT's default target modules for the base's architecture, but PEFT "
            f"has no default for model_type={model_type!r} (it has one for: {format_choices(peft_defaults)}). "
            f"Pass target_modules explicitly, e.g. a list of the base's linear module names (they end in: "
            f"{format_choices(suffixes)}) or 'all-linear'."
        )
    return defaults if isinstance(defaults, str) else list(defaults)


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | str | None) -> list[str]:
    """Module names matched by ``target_modules``, PEFT's way.

    * ``None``: PEFT's default for the base's architecture (:func:`peft_default_target_modules`,
      ``["q_proj", "v_proj"]`` for Llama), then resolved as below.
    * ``"all-linear"``: every linear layer but the output head.
    * another string: a regex that must match a module's full name (``re.fullmatch``).
    * a list: a module matches if its name equals an entry or ends with ``"." + entry``.

    Raises:
        TargetModuleError: if an entry matches no linear layer, or nothing matches, or
            ``None`` is given for an architecture PEFT has no default for.
    """
    if target_modules is None:
        target_modules = peft_default_target_modules(model)
        logger.debug(
            "target_modules=None: PEFT's default for model_type %r is %r.",
            getattr(getattr(model, "config", None), "model_type", None), target_modules,
        )
    candidates = [_strip_wrapper(n) for n in linear_module_names(model)]
    candidates += [
        name for name, module in model.named_modules()
        if type(module).__name__ == "MixtureLinear"
    ]
    candidates = sorted(set(candidates))
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            matched = [n for n in candidates if n.rsplit(".", 1)[-1] not in OUTPUT_LAYER_NAMES]
        else:
            try:
                pattern = re.compile(target_modules)
            except re.error as error:
                raise TargetModuleError(
                    f"target_modules={target_modules!r} is not a valid regex ({error}). Use a list of "
                    f"module names instead, e.g. {suffixes[:4]}."
                ) from error
            matched = [n for n in candidates if pattern.fullmatch(n)]
        if not matched:
            raise TargetModuleError(
                f"target_modules={target_modules!r} matches no linear layer of this base. Linear "
                f"module names end in: {format_choices(suffixes)}."
            )
        return matched
    matched_set: set[str] = set()
    for entry in target_modules:
        hits = [n for n in candidates if n == entry or n.endswith("." + entry)]
        if not hits:
            raise TargetModuleError(
                f"Target module {entry!r} matches no linear layer of this base. Linear module "
                f"names end in: {format_choices(suffixes)}. Or use target_modules='all-linear'."
            )
        matched_set.update(hits)
    return sorted(matched_set)


def module_suffixes(module_names: Sequence[str]) -> list[str]:
    """The distinct last components of ``module_names`` (PEFT's saved ``target_modules``)."""
    return sorted({n.rsplit(".", 1)[-1] for n in module_names})
