"""(IA)^3: "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et al., 2022).

One learned vector per target module rescales activations:

* an attention module (``k_proj``, ``v_proj``): its *output*, ``y = l ⊙ base(x)``, ``l`` of
  shape ``[H_out, 1]``;
* a feed-forward module (``down_proj``, listed in ``feedforward_modules``): its *input*,
  ``y = base(l ⊙ x)``, ``l`` of shape ``[1, H_in]``.

Config keys, tensor names (``base_model.model.<module>.ia3_l``), shapes and initialisation
(``l = 1``: the identity) are PEFT's, so ``peft.PeftModel.from_pretrained`` loads a folder
saved by moa and the other way round.

IA3 is not low rank, so :meth:`IA3Layer.low_rank` returns ``None`` and moa takes the
generic path: for the rows routed to this adapter it adds ``weight * delta(x)`` with
``delta(x) = y - base(x)``. A row that mixes several IA3 adapters therefore gets the
weighted *sum of their changes* (PEFT, which can only stack adapters, multiplies the
vectors instead); a row with one adapter at weight 1 is exactly PEFT's output.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from moa.adapters.base import AdapterConfig, AdapterLayer
from moa.errors import AdapterConfigError

#: PEFT's IA3 defaults for Llama-family bases (``TRANSFORMERS_MODELS_TO_IA3_*_MAPPING``).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
DEFAULT_FEEDFORWARD_MODULES: tuple[str, ...] = ("down_proj",)


@dataclasses.dataclass
class IA3Config(AdapterConfig):
    """IA3 hyper-parameters; the same names and meaning as ``peft.IA3Config``.

    Attributes:
        target_modules: Module names or suffixes, a regex (``re.fullmatch`` on the full
            module name) or ``"all-linear"``. Default: PEFT's choice for Llama bases,
            ``["k_proj", "v_proj", "down_proj"]``.
        feedforward_modules: The targets whose *input* is scaled (the others have their
            output scaled): names/suffixes (``module_name.endswith(entry)``, PEFT's rule)
            or a regex. ``None`` means PEFT's Llama default, ``["down_proj"]``. A list
            must be a subset of a list ``target_modules`` (PEFT checks the same).
        init_ia3_weights: ``True``: vectors start at 1 (the adapter is the identity);
            ``False``: standard normal (for tests; PEFT discourages it).
        fan_in_fan_out, modules_to_save, exclude_modules: PEFT options moa does not
            implement; any value but the default is refused with the next step to take.
        inference_mode: Written as ``True`` (like PEFT's saved configs); ignored on load.

    Example::

        config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                           feedforward_modules=["down_proj"])
        model.add_adapter("tone", config)
    """

    adapter_type: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"

    target_modules: Sequence[str] | str | None = dataclasses.field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    feedforward_modules: Sequence[str] | str | None = None
    init_ia3_weights: bool = True
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    exclude_modules: Sequence[str] | str | None = None
    inference_mode: bool = False

    def validate(self) -> None:
        """Raise :class:`~moa.errors.AdapterConfigError` for values IA3 in moa cannot honour."""
        super().validate()
        ff = self.feedforward_modules
        if ff is not None and not isinstance(ff, str):
            if not all(isinstance(entry, str) for entry in ff):
                raise AdapterConfigError(
                    f"IA3 feedforward_modules must be module names or one regex string; got {ff!r}.")
            if not isinstance(self.target_modules, str):
                missing = sorted(set(ff) - set(self.target_modules or ()))
                if missing:
                    raise AdapterConfigError(
                        f"IA3 feedforward_modules {missing} are not in target_modules "
                        f"{sorted(self.target_modules or ())}; feedforward modules must be "
                        f"targets too (add them to target_modules).")
        elif isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as error:
                raise AdapterConfigError(
                    f"IA3 feedforward_modules={ff!r} is not a valid regex ({error}).") from error
        if not isinstance(self.init_ia3_weights, bool):
            raise AdapterConfigError(
                f"init_ia3_weights must be True or False; got {self.init_ia3_weights!r}.")
        refused = {
            "fan_in_fan_out": (self.fan_in_fan_out, False,
                               "only nn.Linear-style bases are supported"),
            "modules_to_save": (self.modules_to_save or None, None,
                                "save those modules with the base instead"),
            "exclude_modules": (self.exclude_modules or None, None,
                                "list the modules to adapt in target_modules instead"),
        }
        for key, (value, default, step) in refused.items():
            if value != default:
                raise AdapterConfigError(
                    f"IA3 option {key}={value!r} is not supported by moa (only {default!r}); {step}.")

    def feedforward_entries(self) -> Sequence[str] | str:
        """``feedforward_modules`` with ``None`` resolved to PEFT's Llama default."""
        if self.feedforward_modules is None:
            return list(DEFAULT_FEEDFORWARD_MODULES)
        return self.feedforward_modules

    def is_feedforward(self, module_name: str) -> bool:
        """Whether the input (not the output) of ``module_name`` is scaled; PEFT's rule.

        Args:
            module_name: Full module name, e.g. ``"model.layers.0.mlp.down_proj"``.

        Returns:
            ``True`` for a regex that fully matches the name, or a list entry the name ends with.
        """
        entries = self.feedforward_entries()
        if isinstance(entries, str):
            return re.fullmatch(entries, module_name) is not None
        return any(module_name.endswith(entry) for entry in entries)

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes ``adapter_config.json`` for IA3."""
        data = super().to_dict()
        entries = self.feedforward_entries()
        data["feedforward_modules"] = entries if isinstance(entries, str) else sorted(entries)
        data["inference_mode"] = True
        return data


class IA3Layer(AdapterLayer):
    """One IA3 vector on one module; its change to ``base(x)`` for the generic path.

    Args:
        config: The adapter's :class:`IA3Config`.
        module_name: Full name of the target module.
        in_features: The base layer's input width.
        out_features: The base layer's output width.

    Attributes:
        ia3_l: ``[1, H_in]`` (feed-forward module) or ``[H_out, 1]`` (others), as in PEFT.
        is_feedforward: Whether the input (``True``) or the output is scaled.
    """

    peft_suffixes: ClassVar[tuple[str, ...]] = ("ia3_l",)

    def __init__(self, config: IA3Config, module_name: str, in_features: int, out_features: int):
        super().__init__(config, module_name, in_features, out_features)
        self.is_feedforward = config.is_feedforward(module_name)
        shape = (1, in_features) if self.is_feedforward else (out_features, 1)
        init = torch.ones(shape) if config.init_ia3_weights else torch.randn(shape)
        self.ia3_l = nn.Parameter(init)

    def low_rank(self) -> None:
        """IA3 is not low rank: always ``None`` (moa uses :meth:`delta`)."""

    def delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """``y - base(x)`` for rows ``x`` ``[n, H_in]``, where ``y`` is PEFT's IA3 output.

        Output scaling: ``(l - 1) ⊙ base(x)`` (the bias is scaled too, as in PEFT).
        Input scaling: ``base((l - 1) ⊙ x) - bias = W ((l - 1) ⊙ x)``, one base call.

        Args:
            x: ``[n, H_in]`` rows routed to this adapter.
            base_layer: The wrapped ``nn.Linear`` or bitsandbytes ``Linear4bit``.

        Returns:
            ``[n, H_out]`` in the dtype of ``base_layer``'s output.
        """
        scale_minus_one = self.ia3_l.reshape(-1) - 1.0
        if self.is_feedforward:
            out = base_layer(x * scale_minus_one.to(x.dtype))
            bias = getattr(base_layer, "bias", None)
            return out - bias.to(out.dtype) if bias is not None else out
        out = base_layer(x)
        return out * scale_minus_one.to(out.dtype)

    def extra_repr(self) -> str:
        kind = "input (feed-forward)" if self.is_feedforward else "output"
        return f"module={self.module_name!r}, scales={kind}, shape={tuple(self.ia3_l.shape)}"
