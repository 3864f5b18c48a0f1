"""The options LoHa and LoKr share: PEFT's ``LycorisConfig`` fields, checked for moa.

PEFT's ``LoHaConfig`` and ``LoKrConfig`` both derive from ``peft.tuners.lycoris_utils.LycorisConfig``
and share ``r``, ``alpha``, ``rank_dropout``, ``module_dropout``, ``rank_pattern``,
``alpha_pattern``, ``init_weights``, ``use_effective_conv2d`` and the target-selection options.
:class:`LycorisConfig` holds them with PEFT's names and defaults, so ``adapter_config.json``
reads and writes the same on both sides; each type adds its own fields.

The scale of an adapter on a module is ``alpha / r`` (no rank-stabilised variant exists for
these types in PEFT), with ``rank_pattern`` / ``alpha_pattern`` looked up per module as PEFT
does (:func:`moa.adapters.base.pattern_value`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

from moa.adapters.base import AdapterConfig, check_pattern, pattern_value, short
from moa.errors import AdapterConfigError


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (``bool`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_rank(value: Any) -> bool:
    """Whether ``value`` is a positive int (``bool`` is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass
class LycorisConfig(AdapterConfig):
    """Fields every LyCORIS type shares; the same names and defaults as PEFT's.

    Attributes:
        target_modules: Module names or suffixes, a regex (``re.fullmatch`` on the full
            module name) or ``"all-linear"``. ``None`` (PEFT's default) picks PEFT's
            default modules for the base's architecture (``q_proj``, ``v_proj`` for Llama;
            PEFT's LoHa and LoKr tables equal its LoRA table).
        r: Rank of the factors (LoKr: of the factors it decomposes).
        alpha: Scaling numerator: scale = ``alpha / r``.
        rank_dropout: While training, the probability of dropping each *output row* of the
            weight change (PEFT's "rank dropout"; see the type for its rescaling).
        module_dropout: While training, the probability of skipping the adapter on a module
            for a whole forward call.
        rank_pattern: Per-module rank overrides, ``{module suffix or regex: r}``.
        alpha_pattern: Per-module alpha overrides, ``{module suffix or regex: alpha}``.
        use_effective_conv2d: PEFT's option for convolution kernels. It has no effect on
            linear layers in PEFT either, and moa adapts linear layers only, so any value
            is accepted and kept.
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: PEFT
            options moa does not implement; any value but the default is refused with the
            next step to take.
        inference_mode: Written as ``True`` (as PEFT saves it); ignored on load.
    """

    accepts_default_target_modules: ClassVar[bool] = True  # PEFT's per-architecture default
    #: The values ``init_weights`` may take (PEFT's); a subclass widens it.
    init_weights_choices: ClassVar[tuple[Any, ...]] = (True, False)

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    init_weights: bool | str = True
    use_effective_conv2d: bool = False
    exclude_modules: Sequence[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: Sequence[str] | str | None = None
    modules_to_save: list[str] | None = None
    inference_mode: bool = False

    @property
    def type_label(self) -> str:
        """The adapter type as people write it (``"LoHa"``), for messages."""
        return type(self).__name__.removesuffix("Config")

    def validate(self) -> None:
        """Raise :class:`~moa.errors.AdapterConfigError` for values moa cannot honour."""
        super().validate()
        label = self.type_label
        for key in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, key)
            if not isinstance(patterns, dict):
                raise AdapterConfigError(f"{label} field {key} = {short(patterns)} must be an object "
                                         f"{{module suffix or regex: value}}.")
            for pattern in patterns:
                check_pattern(pattern, key)
        if not is_rank(self.r) or not all(is_rank(r) for r in self.rank_pattern.values()):
            raise AdapterConfigError(
                f"{label} rank must be a positive integer; got r={short(self.r)}, "
                f"rank_pattern={short(self.rank_pattern)}. Give r=8 or another positive integer.")
        numbers = [("alpha", self.alpha), ("rank_dropout", self.rank_dropout),
                   ("module_dropout", self.module_dropout),
                   *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]
        for key, value in numbers:
            if not is_number(value):
                raise AdapterConfigError(f"{label} field {key} = {short(value)} must be a finite number.")
        for key in ("rank_dropout", "module_dropout"):
            value = float(getattr(self, key))
            if not 0.0 <= value < 1.0:
                raise AdapterConfigError(
                    f"{label} {key} must be in [0, 1) (a probability, applied while training only); "
                    f"got {value!r}.")
        for key in ("use_effective_conv2d", "inference_mode"):
            if not isinstance(getattr(self, key), bool):
                raise AdapterConfigError(f"{label} field {key} = {short(getattr(self, key))} must be true or false.")
        if not any(self.init_weights is choice or (isinstance(choice, str) and self.init_weights == choice)
                   for choice in self.init_weights_choices):
            raise AdapterConfigError(
                f"{label} init_weights={self.init_weights!r} is not supported. Choices: "
                f"{', '.join(repr(c) for c in self.init_weights_choices)}.")
        refused = {
            "exclude_modules": (self.exclude_modules or None,
                                "list only the modules to adapt in target_modules (or use a regex)"),
            "layers_to_transform": (self.layers_to_transform,
                                    "select layers with a target_modules regex such as "
                                    r"'.*\.layers\.(0|1)\..*q_proj'"),
            "layers_pattern": (self.layers_pattern or None, "select layers with a target_modules regex"),
            "modules_to_save": (self.modules_to_save or None, "save those modules with the base instead"),
        }
        for key, (value, step) in refused.items():
            if value is not None:
                raise AdapterConfigError(
                    f"{label} option {key}={short(value)} is not supported by moa (only None); {step}.")

    def rank_for(self, module_name: str) -> int:
        """Rank on ``module_name`` (``rank_pattern`` applied, as in PEFT)."""
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        """Alpha on ``module_name`` (``alpha_pattern`` applied, as in PEFT)."""
        return float(pattern_value(self.alpha_pattern, module_name, self.alpha))

    def scale_for(self, module_name: str) -> float:
        """``alpha / r`` on ``module_name``: PEFT's ``scaling`` for LoHa and LoKr."""
        return self.alpha_for(module_name) / self.rank_for(module_name)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` fields, ``inference_mode`` set as PEFT saves it."""
        data = super().to_dict()
        data["inference_mode"] = True
        return data
