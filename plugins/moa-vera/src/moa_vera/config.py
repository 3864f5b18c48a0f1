"""``VeraConfig``: VeRA's hyper-parameters, with PEFT's names, defaults and meaning."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

from moa.adapters.base import AdapterConfig, short
from moa.errors import AdapterConfigError

#: The largest ``projection_prng_key`` torch's generator accepts (``manual_seed`` takes 64 bits).
_SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclasses.dataclass
class VeraConfig(AdapterConfig):
    """VeRA hyper-parameters; the same names and defaults as ``peft.VeraConfig``.

    Attributes:
        target_modules: As in :class:`~moa.adapters.base.AdapterConfig`; ``None`` (the
            default, as in PEFT) picks PEFT's default modules for the base's architecture
            (``q_proj`` and ``v_proj`` for Llama), and a saved adapter records them.
        r: The projections' rank. VeRA trains only ``r + H_out`` numbers per module, so
            ranks are high (PEFT's default 256). A loaded adapter's ``r`` must not exceed
            the model's ``max_rank`` (256 by default).
        projection_prng_key: Seed of the frozen random projections ``vera_A`` / ``vera_B``
            (Kaiming-uniform, drawn as PEFT draws them).
        save_projection: ``True``: the projections are saved in the weights file (PEFT's
            default; reloads exactly on any machine). ``False``: only the vectors are saved
            and the projections are regenerated from ``projection_prng_key``.
        vera_dropout: Dropout on the adapter's input while training.
        d_initial: Initial value of every ``vera_lambda_d`` entry (``vera_lambda_b``
            starts at zero, so a new adapter is the identity).
        init_weights: ``True``: PEFT's initialisation (above). ``False``: ``lambda_b = 1``
            and ``lambda_d`` standard normal (for tests; PEFT discourages it).
        fan_in_fan_out, bias, modules_to_save, layers_to_transform, layers_pattern: PEFT
            options moa does not implement; any value but the default is refused with
            the next step to take.
        inference_mode: Written as ``True`` (like PEFT's saved configs); ignored on load.

    Example::

        model.add_adapter("tone", VeraConfig(r=256, target_modules=["q_proj", "v_proj"]))
    """

    adapter_type: ClassVar[str] = "vera"
    peft_type: ClassVar[str] = "VERA"
    accepts_default_target_modules: ClassVar[bool] = True  # PEFT's per-architecture default

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: Sequence[str] | str | None = None
    inference_mode: bool = False

    def validate(self) -> None:
        """Raise :class:`~moa.errors.AdapterConfigError` for values VeRA in moa cannot honour."""
        super().validate()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterConfigError(f"VeRA rank r must be a positive integer; got r={short(self.r)}.")
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not _SEED_RANGE[0] <= key <= _SEED_RANGE[1]:
            raise AdapterConfigError(
                f"VeRA projection_prng_key must be an integer seed (64 bits); got {short(key)}.")
        for name in ("save_projection", "init_weights", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise AdapterConfigError(f"VeRA field {name} = {short(getattr(self, name))} must be true or false.")
        for name in ("vera_dropout", "d_initial"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise AdapterConfigError(f"VeRA field {name} = {short(value)} must be a finite number.")
        if not 0.0 <= float(self.vera_dropout) < 1.0:
            raise AdapterConfigError(f"vera_dropout must be in [0, 1); got {self.vera_dropout!r}.")
        refused = {
            "fan_in_fan_out": (self.fan_in_fan_out, False, "only nn.Linear-style bases are supported"),
            "bias": (self.bias, "none", "train the adapter with bias='none'"),
            "modules_to_save": (self.modules_to_save or None, None, "save those modules with the base instead"),
            "layers_to_transform": (self.layers_to_transform, None, "select layers with a target_modules regex"),
            "layers_pattern": (self.layers_pattern or None, None, "select layers with a target_modules regex"),
        }
        for name, (value, default, step) in refused.items():
            if value != default:
                raise AdapterConfigError(
                    f"VeRA option {name}={value!r} is not supported by moa (only {default!r}); {step}.")

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes ``adapter_config.json`` for VeRA."""
        data = super().to_dict()
        data["inference_mode"] = True
        return data
