"""What every adapter type provides: a config and a per-module layer.

An adapter type (LoRA built in; IA3, DoRA... from plugins) is registered through the
``moa_adapter_types`` hook as an :class:`~moa.plugin.records.AdapterTypeSpec` naming
an :class:`AdapterConfig` subclass and an :class:`AdapterLayer` subclass. The model
builds one layer per target module. Types that can expose ``(A, B, scale)`` take the
batched low-rank kernel path; the others implement :meth:`AdapterLayer.delta`, and may add
:meth:`AdapterLayer.grouped_delta` to compute all their adapters of one module at once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from moa.errors import AdapterConfigError, AdapterShapeError, format_choices


@dataclasses.dataclass
class AdapterConfig:
    """Base of adapter configs; fields mirror PEFT's config of the same type.

    A type whose training needs more than gradient descent on its parameters (AdaLoRA's rank
    allocator) may add a method ``training_extension(*, model, adapter_name, args)``
    returning a :class:`moa.train.extensions.TrainingExtension` (Trainer callbacks, a loss
    term); ``moa.train.train_adapter`` picks it up.

    Attributes:
        target_modules: Module names or suffixes (``["q_proj", "v_proj"]``), a regex
            matched against full module names, or ``"all-linear"``. ``None`` only for
            types with :attr:`accepts_default_target_modules` (PEFT's default for the
            base's architecture, resolved when the adapter is added).
        base_model_name_or_path: The base this adapter was made for (informational;
            the fingerprint in the weights file is what is checked).
        task_type: PEFT task type (``"CAUSAL_LM"``).
    """

    adapter_type: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    #: Whether ``target_modules=None`` means PEFT's default modules for the base's architecture
    #: (``moa.model.targets.peft_default_target_modules``); otherwise ``None`` is refused.
    accepts_default_target_modules: ClassVar[bool] = False

    target_modules: Sequence[str] | str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def validate(self) -> None:
        """Raise :class:`AdapterConfigError` for values this type cannot honour."""
        for key in ("base_model_name_or_path", "task_type"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise AdapterConfigError(f"{type(self).__name__} field {key} = {short(value)} must be a string or null.")
        if self.target_modules is None and self.accepts_default_target_modules:
            return  # resolved against the base when the adapter is added
        modules = self.target_modules
        if isinstance(modules, str):
            check_pattern(modules, "target_modules")
            return
        if (
            modules is None or isinstance(modules, Mapping) or not isinstance(modules, (list, tuple, set, frozenset))
            or len(modules) == 0 or not all(isinstance(m, str) and m for m in modules)
        ):
            raise AdapterConfigError(
                f"{type(self).__name__} needs target_modules: a list of module names, a regex or 'all-linear'; "
                f"got {short(modules)}. Give module names such as ['q_proj', 'v_proj'] or 'all-linear'."
            )

    def to_dict(self) -> dict[str, Any]:
        """The config as written to ``adapter_config.json`` (PEFT keys)."""
        data = dataclasses.asdict(self)
        if data.get("target_modules") is not None and not isinstance(data["target_modules"], str):
            data["target_modules"] = sorted(data["target_modules"])
        data["peft_type"] = self.peft_type
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Build from an ``adapter_config.json`` dict; unknown keys are ignored.

        Subclasses reject values they cannot honour in :meth:`validate`.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        config = cls(**kwargs)
        config.validate()
        return config


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_pattern(pattern: Any, field: str) -> None:
    """Raise :class:`AdapterConfigError` unless ``pattern`` is a non-empty regex string that compiles."""
    if not isinstance(pattern, str) or not pattern:
        raise AdapterConfigError(f"{field}: {short(pattern)} is not a module name or regex (a non-empty string).")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise AdapterConfigError(f"{field}: {short(pattern)} is not a valid regex ({error}). "
                                 f"Give module names such as 'q_proj', or a valid regex.") from error


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup for one module.

    A key matches a module when the module's full name ends with it (on a ``.``
    boundary) or the key, as a regex, matches such an ending.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class GroupedRows:
    """The rows one module routes, in one forward, to its adapters of one layer class.

    Rows are the flattened tokens of the batch (``x`` is ``[T, H_in]``). A *pair* is one row
    and one adapter it uses: a row mixing two adapters of the class gives two pairs, a row
    without any gives none. Pairs are grouped by adapter, in the order of :attr:`layers`,
    and keep the rows' order inside a group.

    Attributes:
        layers: The adapters' layers on this module (all of one class), in slot order.
        token_index: ``[P]`` int64: the row of ``x`` of each pair.
        offsets: ``len(layers) + 1`` ints: the pairs of ``layers[i]`` are
            ``offsets[i]:offsets[i + 1]``.
    """

    layers: tuple[AdapterLayer, ...]
    token_index: torch.Tensor
    offsets: tuple[int, ...]

    @property
    def num_pairs(self) -> int:
        """``P``, the number of pairs (rows of what :meth:`AdapterLayer.grouped_delta` returns)."""
        return self.offsets[-1]

    def span(self, i: int) -> tuple[int, int]:
        """``(start, end)``: the pairs of ``layers[i]``."""
        return self.offsets[i], self.offsets[i + 1]


class AdapterLayer(nn.Module):
    """One adapter's weights on one target module.

    Args:
        config: The adapter's config.
        module_name: Full name of the target module in the base (``model.layers.0.self_attn.q_proj``).
        in_features: The base layer's input width.
        out_features: The base layer's output width.
    """

    #: Tensor-name suffixes in PEFT's state dict, e.g. ``("lora_A.weight", "lora_B.weight")``.
    peft_suffixes: ClassVar[tuple[str, ...]] = ()
    #: Full PEFT names of *adapter-level* tensors: one tensor per adapter, shared by all its
    #: modules and saved once (VeRA's ``("base_model.vera_A", "base_model.vera_B")``). Empty
    #: for types whose tensors are all per module. See :meth:`shared_peft_state_dict` and
    #: :meth:`load_shared_peft_state_dict`.
    shared_peft_keys: ClassVar[tuple[str, ...]] = ()
    #: ``True`` when :meth:`low_rank` *computes* its factors from the parameters (AdaLoRA's
    #: ``E * A``) instead of returning parameters: the model then asks again on every forward,
    #: so training sees fresh factors in the autograd graph. Such a ``low_rank`` should return
    #: the same tensor objects while the parameters are unchanged (outside autograd), so the
    #: kernels' packed buffers are reused at inference.
    low_rank_is_computed: ClassVar[bool] = False

    def __init__(self, config: AdapterConfig, module_name: str, in_features: int, out_features: int):
        super().__init__()
        self.module_name = module_name
        self.in_features = in_features
        self.out_features = out_features

    def attach_base(self, base_layer: nn.Module) -> None:
        """Called once when the layer is installed on ``base_layer`` (before any forward).

        Types whose parameters depend on the base weight (DoRA's magnitude) initialise them
        here. The default does nothing. Do not keep a reference that nn.Module would
        register as a submodule (the base is not part of the adapter).
        """

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A [r, H_in], B [H_out, r], scale)`` if this layer is low rank, else ``None``."""
        return None

    def delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The change this adapter makes to ``base_layer(x)`` for rows ``x`` ``[n, H_in]``.

        Only called for types whose :meth:`low_rank` returns ``None``.
        """
        raise AdapterConfigError(
            f"{type(self).__name__} neither exposes low_rank() nor implements delta(); "
            f"an adapter type must provide one of them."
        )

    @classmethod
    def grouped_delta(cls, x: torch.Tensor, rows: GroupedRows, base_layer: nn.Module) -> torch.Tensor | None:
        """Optional: :meth:`delta` for all this class's adapters used on one module, in one call.

        For types that compute several adapters together faster than one by one (VeRA's
        adapters share their random projections). When a class defines it, moa calls it once
        per module and forward with every pair routed to that class's adapters there, instead
        of :meth:`delta` once per adapter. It must return what the per-adapter path would
        give: row ``p`` of the result is ``rows.layers[i].delta(x[rows.token_index[p]])`` for
        the ``p`` in ``rows.span(i)``. The result is *not* weighted: moa multiplies each pair
        by its routing weight and adds it to its row, as it does with :meth:`delta`. Return
        ``None`` to have moa call :meth:`delta` per adapter this time (e.g. while training
        with dropout). The default (not overridden) is never called.

        Args:
            x: ``[T, H_in]``, every row of this forward at this module (not only the routed ones).
            rows: Which rows each adapter gets (:class:`GroupedRows`).
            base_layer: The wrapped base layer, as for :meth:`delta`.

        Returns:
            ``[rows.num_pairs, H_out]``, or ``None``.
        """
        return None

    def dropout_p(self) -> float:
        """Input dropout probability used while training (0 = none)."""
        return 0.0

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors keyed by PEFT suffix (``"lora_A.weight"``), for saving."""
        return {suffix: self.get_parameter(suffix).detach() for suffix in self.peft_suffixes}

    def load_peft_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy tensors keyed by PEFT suffix into this layer, checking names and shapes."""
        check_peft_tensors(self, tensors)
        with torch.no_grad():
            for suffix, tensor in tensors.items():
                param = self.get_parameter(suffix)
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    # -- adapter-level tensors (optional; see ``shared_peft_keys``) -------------------------

    @classmethod
    def shared_peft_state_dict(
        cls, config: AdapterConfig, layers: Mapping[str, AdapterLayer]
    ) -> dict[str, torch.Tensor]:
        """The adapter-level tensors to save with one adapter, keyed by full PEFT name.

        Called once per saved adapter, beside the per-module :meth:`peft_state_dict` of
        each layer. Every key must be one of :attr:`shared_peft_keys`. The default saves none.

        Args:
            config: The adapter's config.
            layers: Module name -> this adapter's layer on it (all of this class).

        Returns:
            Full tensor name (e.g. ``"base_model.vera_A"``) -> tensor.
        """
        return {}

    @classmethod
    def load_shared_peft_state_dict(
        cls, config: AdapterConfig, layers: Mapping[str, AdapterLayer], tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Hand one loaded adapter's adapter-level tensors to its layers.

        Called once per loaded adapter, after every layer got its per-module tensors and
        before the adapter is installed, with the file's tensors whose names are in
        :attr:`shared_peft_keys`: possibly fewer, or none, so a type can rebuild missing
        ones (VeRA regenerates its projections from a seed in the config). Raise a
        :class:`~moa.errors.MoaError` (``AdapterShapeError``, ``AdapterFormatError``) for
        tensors it cannot use; nothing is installed then. The default expects none.

        Args:
            config: The adapter's config, as read from ``adapter_config.json``.
            layers: Module name -> the adapter's layer on it, per-module tensors loaded.
            tensors: Full tensor name -> tensor (CPU), as stored in the file.
        """


def check_peft_tensors(layer: AdapterLayer, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`AdapterShapeError` unless ``tensors`` are exactly the layer's, same shapes."""
    expected = set(layer.peft_suffixes)
    if set(tensors) != expected:
        raise AdapterShapeError(
            f"Module {layer.module_name!r}: the adapter file has tensors "
            f"{format_choices(tensors)} but a {type(layer).__name__} needs "
            f"{format_choices(expected)}. Was it saved for another adapter type?"
        )
    for suffix, tensor in tensors.items():
        want = tuple(layer.get_parameter(suffix).shape)
        if tuple(tensor.shape) != want:
            raise AdapterShapeError(
                f"Module {layer.module_name!r}: tensor {suffix!r} has shape "
                f"{tuple(tensor.shape)} but this base needs {want} (in_features="
                f"{layer.in_features}, out_features={layer.out_features}). The adapter was "
                f"probably made for another base model."
            )
