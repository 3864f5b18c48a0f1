"""AdaLoRA's hyper-parameters, with PEFT's names, defaults and saved form (``peft_type`` ``"ADALORA"``).

AdaLoRA (Zhang et al., ICLR 2023) parametrises each update in SVD form, ``B @ diag(E) @ A``,
and prunes the least important singular values while training, under a budget that shrinks
on a cubic schedule from ``init_r`` to ``target_r`` ranks per module on average. The ranks
it ends with are saved as ``rank_pattern``: for each module, a keep-mask over its ``init_r``
rows (``{"model.layers.0.self_attn.q_proj.lora_E": [true, false, ...]}``), with the saved
tensors cut to the kept rows, exactly as PEFT writes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from moa.adapters.base import AdapterConfig, short
from moa.errors import AdapterConfigError

#: The tensor a saved ``rank_pattern`` key names: ``"<module>.lora_E"``.
PATTERN_SUFFIX = ".lora_E"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA hyper-parameters; the same names and meaning as ``peft.AdaLoraConfig``.

    Attributes:
        target_modules: Module names or suffixes, a regex (``re.fullmatch`` on the full
            module name) or ``"all-linear"``. Required (PEFT's default for Llama bases is
            ``["q_proj", "v_proj"]``).
        init_r: Rank of every module before pruning.
        target_r: Average rank per module the allocator prunes down to.
        tinit: Steps of warm-up before pruning starts.
        tfinal: Steps at the end with the final ranks fixed (fine-tuning only).
        deltaT: Steps between two budget allocations.
        beta1: EMA coefficient of the sensitivity, in (0, 1).
        beta2: EMA coefficient of the uncertainty, in (0, 1).
        orth_reg_weight: Weight of the orthogonality regulariser on ``A`` and ``B``.
        total_step: Training steps the budget schedule spans. PEFT requires it (> 0, with
            ``tinit < total_step - tfinal``), also for adapters only used for inference.
        rank_pattern: The ranks the allocator chose, ``{"<module>.lora_E": [keep, ...]}``
            with one boolean per initial rank; ``None`` means every module has ``init_r``.
            Written by training, read on load.
        lora_alpha: Scale numerator: the update is multiplied by
            ``lora_alpha / (init_r + 1e-5)`` (``init_r / (init_r + 1e-5)`` when
            ``lora_alpha <= 0``, PEFT's rule; the denominator stays ``init_r`` after pruning).
        lora_dropout: Dropout on the adapter's input while training.
        init_lora_weights: ``True``: ``E = 0`` (the identity), ``A`` and ``B`` normal with
            std 0.02, as PEFT; ``False``: all three standard normal (for tests).
        r: PEFT's LoRA rank field, unused by AdaLoRA (``init_r`` is the rank); kept so a
            saved config round-trips.
        bias, fan_in_fan_out, modules_to_save, layers_to_transform, layers_pattern,
            exclude_modules, use_dora: PEFT options moa does not implement; any value but
            the default is refused with the next step to take.
        inference_mode: Written as ``True`` (like PEFT's saved configs); ignored on load.

    Example::

        config = AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=12, target_r=4,
                               tinit=10, tfinal=20, total_step=100)
        model.add_adapter("sql", config)
    """

    adapter_type: ClassVar[str] = "adalora"
    peft_type: ClassVar[str] = "ADALORA"

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    init_lora_weights: bool = True
    r: int = 8
    bias: str = "none"
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    use_dora: bool = False
    inference_mode: bool = False

    def validate(self) -> None:
        """Raise :class:`~moa.errors.AdapterConfigError` for values PEFT or moa would not accept.

        These are the checks PEFT's ``AdaLoraConfig`` makes when it is created (so a folder
        moa writes loads in PEFT) plus types. The allocator's own requirements
        (``0 < beta < 1``, ``target_r < init_r``) are checked when training starts.
        """
        super().validate()
        name = type(self).__name__
        for key in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "r"):
            value = getattr(self, key)
            low = 1 if key in ("init_r", "deltaT") else 0
            if not _is_int(value) or value < low:
                raise AdapterConfigError(f"{name} field {key} = {short(value)} must be an integer >= {low}.")
        if not _is_int(self.total_step) or self.total_step <= 0:
            raise AdapterConfigError(
                f"{name} needs total_step, the number of training steps the rank budget schedule spans "
                f"(an integer > 0, as PEFT requires); got {short(self.total_step)}. Set it to the number of "
                f"optimizer steps you train for.")
        if self.tinit >= self.total_step - self.tfinal:
            raise AdapterConfigError(
                f"{name}: tinit={self.tinit} must be below total_step - tfinal = {self.total_step} - "
                f"{self.tfinal}, or no step is left for pruning. Decrease tinit or tfinal, or increase total_step.")
        for key in ("beta1", "beta2", "orth_reg_weight", "lora_alpha", "lora_dropout"):
            if not _is_number(getattr(self, key)):
                raise AdapterConfigError(f"{name} field {key} = {short(getattr(self, key))} must be a finite number.")
        if self.orth_reg_weight < 0:
            raise AdapterConfigError(f"{name}: orth_reg_weight must be >= 0; got {self.orth_reg_weight!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise AdapterConfigError(f"{name}: lora_dropout must be in [0, 1); got {self.lora_dropout!r}.")
        for key in ("init_lora_weights", "inference_mode"):
            if not isinstance(getattr(self, key), bool):
                raise AdapterConfigError(
                    f"{name} field {key} = {short(getattr(self, key))} must be true or false.")
        self._validate_rank_pattern()
        refused = {
            "use_dora": (self.use_dora, False, "PEFT's AdaLoRA does not support DoRA either"),
            "bias": (self.bias, "none", "train the adapter with bias='none'"),
            "fan_in_fan_out": (self.fan_in_fan_out, False, "only nn.Linear-style bases are supported"),
            "modules_to_save": (self.modules_to_save or None, None, "save those modules with the base instead"),
            "layers_to_transform": (self.layers_to_transform, None, "select layers with a target_modules regex"),
            "layers_pattern": (self.layers_pattern or None, None, "select layers with a target_modules regex"),
            "exclude_modules": (self.exclude_modules or None, None,
                                "list the modules to adapt in target_modules instead"),
        }
        for key, (value, default, step) in refused.items():
            if value != default:
                raise AdapterConfigError(
                    f"AdaLoRA option {key}={short(value)} is not supported by moa (only {default!r}); {step}.")

    def _validate_rank_pattern(self) -> None:
        pattern = self.rank_pattern
        if pattern is None:
            return
        if not isinstance(pattern, Mapping):
            raise AdapterConfigError(
                f"AdaLoRA rank_pattern = {short(pattern)} must be null or an object "
                f"{{'<module>.lora_E': [true, false, ...]}}.")
        for key, mask in pattern.items():
            if not isinstance(key, str) or not key.endswith(PATTERN_SUFFIX):
                raise AdapterConfigError(
                    f"AdaLoRA rank_pattern key {short(key)} must name a module's singular values, "
                    f"'<module name>{PATTERN_SUFFIX}' (as PEFT saves it).")
            if (not isinstance(mask, list) or len(mask) != self.init_r
                    or not all(isinstance(keep, bool) for keep in mask)):
                raise AdapterConfigError(
                    f"AdaLoRA rank_pattern[{key!r}] = {short(mask)} must be a list of init_r={self.init_r} "
                    f"booleans (which of the initial ranks are kept). Re-save the adapter with PEFT or moa.")

    def mask_for(self, module_name: str) -> list[bool] | None:
        """The saved keep-mask of ``module_name`` (``None``: not pruned, all ``init_r`` ranks).

        Args:
            module_name: Full module name, e.g. ``"model.layers.0.self_attn.q_proj"``.
        """
        if not self.rank_pattern:
            return None
        return self.rank_pattern.get(module_name + PATTERN_SUFFIX)

    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes ``adapter_config.json`` for AdaLoRA."""
        data = super().to_dict()
        data["inference_mode"] = True
        return data

    def training_extension(self, *, model: Any, adapter_name: str, args: Any) -> Any:
        """The rank allocator (a Trainer callback) and the orthogonality regulariser (a loss term).

        moa's ``train_adapter`` calls this before training (see
        :mod:`moa.train.extensions`).

        Args:
            model: The :class:`~moa.MixtureModel` holding the adapter.
            adapter_name: The adapter about to be trained.
            args: The run's ``transformers.TrainingArguments``.

        Returns:
            A :class:`moa.train.extensions.TrainingExtension`.
        """
        from moa_adalora.training import adalora_training_extension  # peft and transformers: on use

        return adalora_training_extension(self, model=model, adapter_name=adapter_name, args=args)
