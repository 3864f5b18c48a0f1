"""LoRA, the built-in adapter type (registered by ``moa.default_plugins.lora``).

Tensor names, config keys and initialisation follow PEFT, so a folder saved here loads
with ``peft.PeftModel.from_pretrained`` and the other way round.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from moa.adapters.base import AdapterConfig, AdapterLayer, check_pattern, pattern_value, short
from moa.errors import AdapterConfigError


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA hyper-parameters; the same names and defaults as ``peft.LoraConfig``.

    Attributes:
        target_modules: As in :class:`~moa.adapters.base.AdapterConfig`; ``None`` (the
            default, as in PEFT) picks PEFT's default modules for the base's architecture
            (``q_proj`` and ``v_proj`` for Llama), and a saved adapter records them.
        r: Rank.
        lora_alpha: Scaling numerator: scale = ``lora_alpha / r`` (or ``/ sqrt(r)`` with
            ``use_rslora``).
        lora_dropout: Dropout on the adapter's input while training.
        use_rslora: Rank-stabilised scaling.
        rank_pattern: Per-module rank overrides, ``{module suffix or regex: r}``.
        alpha_pattern: Per-module alpha overrides.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: the adapter starts as the
            identity), ``"gaussian"`` (A normal with std 1/r, B zero) or ``False`` (both
            random; for tests).
        bias, fan_in_fan_out, modules_to_save, layers_to_transform, use_dora: PEFT
            options moa does not implement; any value but the default is refused with
            the next step to take.

    Example::

        model.add_adapter("sql", moa.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    """

    adapter_type: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    accepts_default_target_modules: ClassVar[bool] = True  # PEFT's per-architecture default

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    init_lora_weights: bool | str = True
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    use_dora: bool = False
    inference_mode: bool = False

    def validate(self) -> None:
        """Raise :class:`AdapterConfigError` for values moa's LoRA cannot honour.

        ``target_modules=None`` is valid: PEFT's default for the base is used.
        """
        super().validate()
        for key in ("rank_pattern", "alpha_pattern"):
            patterns = getattr(self, key)
            if not isinstance(patterns, dict):
                raise AdapterConfigError(f"LoRA field {key} = {short(patterns)} must be an object "
                                         f"{{module suffix or regex: value}}.")
            for pattern in patterns:
                check_pattern(pattern, key)
        ranks = [self.r, *self.rank_pattern.values()]
        if any(not isinstance(r, int) or isinstance(r, bool) or r <= 0 for r in ranks):
            raise AdapterConfigError(
                f"LoRA rank must be a positive integer; got r={short(self.r)}, "
                f"rank_pattern={short(self.rank_pattern)}."
            )
        for key, value in [("lora_alpha", self.lora_alpha), ("lora_dropout", self.lora_dropout),
                           *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise AdapterConfigError(f"LoRA field {key} = {short(value)} must be a finite number.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}.")
        for key in ("use_rslora", "inference_mode"):
            if not isinstance(getattr(self, key), bool):
                raise AdapterConfigError(f"LoRA field {key} = {short(getattr(self, key))} must be true or false.")
        if not isinstance(self.init_lora_weights, (bool, str)) or self.init_lora_weights not in (True, False, "gaussian"):
            raise AdapterConfigError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported. "
                f"Choices: True, False, 'gaussian'."
            )
        refused = {
            "use_dora": (self.use_dora, False, "DoRA is the moa-dora plugin: pip install ./plugins/moa-dora"),
            "bias": (self.bias, "none", "train the adapter with bias='none'"),
            "fan_in_fan_out": (self.fan_in_fan_out, False, "only nn.Linear-style bases are supported"),
            "modules_to_save": (self.modules_to_save or None, None, "save those modules with the base instead"),
            "layers_to_transform": (self.layers_to_transform, None, "select layers with a target_modules regex"),
        }
        for key, (value, default, step) in refused.items():
            if value != default:
                raise AdapterConfigError(
                    f"LoRA option {key}={value!r} is not supported by moa (only {default!r}); {step}."
                )

    def rank_for(self, module_name: str) -> int:
        """Rank of this adapter on ``module_name`` (``rank_pattern`` applied)."""
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def scale_for(self, module_name: str) -> float:
        """Scale of this adapter on ``module_name`` (``alpha_pattern``, rslora applied)."""
        rank = self.rank_for(module_name)
        alpha = float(pattern_value(self.alpha_pattern, module_name, self.lora_alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_dict(self) -> dict[str, Any]:
        """PEFT's ``adapter_config.json`` fields, with ``inference_mode`` set as PEFT writes it for a saved adapter."""
        data = super().to_dict()
        data["inference_mode"] = True
        return data


class LoraLayer(AdapterLayer):
    """``delta(x) = scale * B @ (A @ dropout(x))`` on one module."""

    peft_suffixes: ClassVar[tuple[str, ...]] = ("lora_A.weight", "lora_B.weight")

    def __init__(self, config: LoraConfig, module_name: str, in_features: int, out_features: int):
        super().__init__(config, module_name, in_features, out_features)
        rank = config.rank_for(module_name)
        self.rank = rank
        self.scale = config.scale_for(module_name)
        self.dropout = float(config.lora_dropout)
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        self.reset_parameters(config.init_lora_weights)

    def reset_parameters(self, init: bool | str = True) -> None:
        """Initialise like PEFT: with ``init`` True or "gaussian", B is zero (identity)."""
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.rank)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B.weight)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A [r, in], B [out, r], scale)``: the update is ``scale * B @ A``."""
        return self.lora_A.weight, self.lora_B.weight, self.scale

    def dropout_p(self) -> float:
        """The LoRA dropout probability (applied in training only)."""
        return self.dropout

    def delta_weight(self) -> torch.Tensor:
        """The dense ``[H_out, H_in]`` change this layer makes: ``scale * B @ A``."""
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)
