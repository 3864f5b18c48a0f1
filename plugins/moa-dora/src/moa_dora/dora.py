"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., 2024), as PEFT implements it.

A DoRA adapter is a LoRA adapter (``A [r, H_in]``, ``B [H_out, r]``, ``scale``) plus a
learned magnitude vector ``m [H_out]``. With ``W`` the (dequantized) base weight and the
column norm ``n = ||W + scale * B @ A||`` taken per output row (detached from autograd, as
the paper's section 4.3 and PEFT do), the layer computes::

    y = base(x) + (m / n - 1) ⊙ (W x) + (m / n) ⊙ scale * B A x

which is PEFT's ``DoraLinearLayer.forward`` (the bias is not rescaled). On disk it is a
PEFT LoRA folder with ``"use_dora": true`` and one more tensor per module,
``base_model.model.<module>.lora_magnitude_vector``.

Not low rank, so :meth:`DoraLayer.low_rank` is ``None`` and moa applies it on the generic
path, per adapter, for just the rows routed to it: DoRA rows mix freely with LoRA, IA3 or
base rows in one batch (PEFT refuses DoRA with ``adapter_names``).

The norm ``n`` needs the dense base weight: it is dequantized (bitsandbytes, for NF4) and
the norm computed once, then cached until ``A``, ``B`` or the base weight change (tracked
by tensor version counters), i.e. once per optimizer step while training and once ever at
inference; never per token.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moa import LoraConfig, LoraLayer
from moa.errors import AdapterConfigError


@dataclasses.dataclass
class DoraConfig(LoraConfig):
    """DoRA hyper-parameters: ``peft.LoraConfig`` with ``use_dora=True``.

    Every LoRA field keeps its meaning (``r``, ``lora_alpha``, ``use_rslora``, patterns,
    ``init_lora_weights``, ``lora_dropout``). Saved as ``peft_type`` ``"LORA"`` with
    ``"use_dora": true``, exactly as PEFT writes a DoRA adapter.

    Example::

        model.add_adapter("sql", DoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    """

    adapter_type: ClassVar[str] = "dora"
    peft_type: ClassVar[str] = "LORA"

    use_dora: bool = True

    @classmethod
    def accepts(cls, config: Mapping[str, Any]) -> bool:
        """Claim ``adapter_config.json`` dicts of PEFT DoRA adapters.

        moa's loader asks every adapter type whose config class has ``accepts`` before
        falling back to the type registered for the ``peft_type``.

        Args:
            config: A parsed ``adapter_config.json``.

        Returns:
            ``True`` for ``peft_type`` ``"LORA"`` (any case) with ``use_dora`` true.
        """
        peft_type = config.get("peft_type")
        return (isinstance(peft_type, str) and peft_type.upper() == "LORA"
                and config.get("use_dora") is True)

    def validate(self) -> None:
        """LoRA's checks, plus ``use_dora`` must be true (plain LoRA is ``moa.LoraConfig``)."""
        if self.use_dora is not True:
            raise AdapterConfigError(
                f"DoraConfig needs use_dora=True; got {self.use_dora!r}. For plain LoRA use "
                f"moa.LoraConfig.")
        LoraConfig.validate(dataclasses.replace(self, use_dora=False))


def dense_base_weight(base_layer: nn.Module) -> torch.Tensor:
    """The ``[H_out, H_in]`` weight of ``base_layer``, dequantized if it is NF4/FP4.

    Args:
        base_layer: An ``nn.Linear`` or a bitsandbytes ``Linear4bit``.

    Returns:
        A detached dense tensor (a fresh one for 4-bit layers; callers must not keep it
        around, so a quantized base never stays dequantized in memory).
    """
    weight = base_layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state).detach()
    return weight.detach()


class DoraLayer(LoraLayer):
    """One DoRA adapter on one module: LoRA factors plus a magnitude vector.

    The LoRA half (rank, scale, dropout, PEFT's initialisation) is moa's :class:`LoraLayer`.
    The magnitude starts (as in PEFT) at ``||W + scale * B @ A||`` per row, so a fresh
    adapter with ``B = 0`` is the identity. That needs the base weight: a layer built by
    ``model.add_adapter`` initialises its magnitude in :meth:`attach_base`, as the model
    installs it; a loaded one takes the saved vector.

    Args:
        config: The adapter's :class:`DoraConfig`.
        module_name: Full name of the target module.
        in_features: The base layer's input width.
        out_features: The base layer's output width.
    """

    peft_suffixes: ClassVar[tuple[str, ...]] = (
        "lora_A.weight", "lora_B.weight", "lora_magnitude_vector")

    def __init__(self, config: DoraConfig, module_name: str, in_features: int, out_features: int):
        super().__init__(config, module_name, in_features, out_features)  # calls reset_parameters
        self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features))
        self._norm_key: tuple[Any, ...] | None = None
        self._norm: torch.Tensor | None = None
        self._base: weakref.ref[nn.Module] | None = None  # not a submodule: the base is not ours

    def reset_parameters(self, init: bool | str = True) -> None:
        """LoRA's initialisation; the magnitude is then re-derived from the base weight."""
        super().reset_parameters(init)
        self._magnitude_ready = False

    def low_rank(self) -> None:
        """DoRA is applied on the generic path: always ``None``."""

    # -- the weight norm -------------------------------------------------------------------

    def weight_norm(self, base_layer: nn.Module) -> torch.Tensor:
        """``||W + scale * B @ A||`` per output row, ``[H_out]`` float32, detached and cached.

        Recomputed only when ``A``, ``B`` or the base weight changed since the last call
        (optimizer steps and ``copy_`` bump a tensor's version counter).

        Args:
            base_layer: The wrapped base layer (dense or 4-bit).
        """
        lora_a, lora_b, base_weight = self.lora_A.weight, self.lora_B.weight, base_layer.weight
        key = (id(base_layer), base_weight.data_ptr(), base_weight._version,
               lora_a.data_ptr(), lora_a._version, lora_b.data_ptr(), lora_b._version, self.scale)
        if self._norm is None or key != self._norm_key:
            with torch.no_grad():
                weight = dense_base_weight(base_layer).to(device=lora_a.device, dtype=torch.float32)
                weight = weight + self.scale * (lora_b.float() @ lora_a.float())
                self._norm = torch.linalg.norm(weight, dim=1)
            self._norm_key = key
        return self._norm

    def attach_base(self, base_layer: nn.Module) -> None:
        """Set a new adapter's magnitude to ``||W + scale * B @ A||`` as it is installed.

        A loaded adapter keeps its saved magnitude (``load_peft_state_dict`` ran first).
        """
        self._base = weakref.ref(base_layer)
        self._ensure_magnitude(self.weight_norm(base_layer))

    def delta_weight(self) -> torch.Tensor:
        """The exact dense change DoRA makes: ``(m / ||W + s B A||) * (W + s B A) - W``.

        Used to fold the adapter into the base (``merge_into_base``); unlike LoRA's, it
        depends on the base weight, which the layer saw in :meth:`attach_base`.

        Raises:
            AdapterConfigError: The layer was never installed on a base.
        """
        base_layer = self._base() if self._base is not None else None
        if base_layer is None:
            raise AdapterConfigError(
                f"DoRA adapter on {self.module_name!r} is not installed on a base, so its dense "
                f"change (which depends on the base weight) cannot be computed.")
        with torch.no_grad():
            weight = dense_base_weight(base_layer).float()
            directed = weight + self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())
            norm = self.weight_norm(base_layer).float()
            magnitude = self.lora_magnitude_vector.detach().float()
            return (magnitude / norm)[:, None] * directed - weight

    def _ensure_magnitude(self, norm: torch.Tensor) -> None:
        if not self._magnitude_ready:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(norm.to(self.lora_magnitude_vector.dtype))
            self._magnitude_ready = True

    # -- the generic path ------------------------------------------------------------------

    def delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """``(m/n - 1) ⊙ W x + (m/n) ⊙ scale * B A x`` for rows ``x`` ``[n, H_in]``.

        While training, dropout is applied to ``x`` first (both terms), as in PEFT.

        Args:
            x: ``[n, H_in]`` rows routed to this adapter.
            base_layer: The wrapped ``nn.Linear`` or bitsandbytes ``Linear4bit``.

        Returns:
            ``[n, H_out]`` in the adapter's dtype.
        """
        norm = self.weight_norm(base_layer)
        self._ensure_magnitude(norm)
        if self.training and self.dropout > 0:
            x = F.dropout(x, p=self.dropout, training=True)
        lora_a = self.lora_A.weight
        lora = F.linear(F.linear(x.to(lora_a.dtype), lora_a), self.lora_B.weight) * self.scale
        base_out = base_layer(x)
        bias = getattr(base_layer, "bias", None)
        if bias is not None:
            base_out = base_out - bias.to(base_out.dtype)
        mag_scale = (self.lora_magnitude_vector / norm.to(self.lora_magnitude_vector.dtype)).to(lora.dtype)
        return (mag_scale - 1) * base_out.to(lora.dtype) + mag_scale * lora

    # -- PEFT tensors ----------------------------------------------------------------------

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors keyed by PEFT suffix, for saving.

        Raises:
            AdapterConfigError: The magnitude was never initialised: a layer built by hand
                and never installed on a base (its magnitude comes from the base weight).
        """
        if not self._magnitude_ready:
            raise AdapterConfigError(
                f"DoRA adapter on {self.module_name!r}: its magnitude vector is initialised from "
                f"the base weight when the layer is installed on a base, which has not happened. "
                f"Create DoRA adapters with model.add_adapter(name, DoraConfig(...)).")
        return super().peft_state_dict()

    def load_peft_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved tensors in (names and shapes checked); the magnitude is then ready."""
        super().load_peft_state_dict(tensors)
        self._magnitude_ready = True
        self._norm, self._norm_key = None, None

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, rank={self.rank}, scale={self.scale:g}"
