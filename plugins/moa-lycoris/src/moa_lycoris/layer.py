"""What a LoHa and a LoKr layer share: the generic-path ``delta``, dropout and PEFT tensors.

Neither type is low rank, so :meth:`LycorisLayer.low_rank` is ``None`` and moa takes its
generic path: for the rows routed to this adapter it adds ``weight * delta(x)``. A row that
mixes several adapters of these types therefore gets ``sum_i w_i * x @ ΔW_i.T``, the weighted
sum of their weight changes, exactly what merging that mixture folds into the base.

Training-time dropout follows PEFT's ``LycorisLayer`` forward, in the same order of random
draws: first one draw for *module dropout* (the adapter is skipped on this module for the
whole call when ``rand(1) <= module_dropout``; PEFT draws it whenever it trains, even at
probability 0), then, if ``rank_dropout > 0``, one draw per output row for *rank dropout*
(each row of ``ΔW`` is kept when ``rand > rank_dropout``; the type decides the rescaling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from moa.adapters.base import AdapterLayer
from moa.errors import AdapterShapeError, format_choices
from moa_lycoris.config import LycorisConfig


class LycorisLayer(AdapterLayer):
    """Shared base of :class:`~moa_lycoris.LoHaLayer` and :class:`~moa_lycoris.LoKrLayer`.

    Subclasses create their parameters under PEFT's tensor names, list the ones this layer
    holds in :attr:`tensor_names`, and implement :meth:`delta_weight` and :meth:`apply_delta`.

    Args:
        config: The adapter's config.
        module_name: Full name of the target module.
        in_features: The base layer's input width.
        out_features: The base layer's output width.

    Attributes:
        rank: ``r`` on this module (``rank_pattern`` applied).
        alpha: ``alpha`` on this module (``alpha_pattern`` applied).
        scale: ``alpha / rank``.
        rank_dropout: Probability of dropping an output row of ``ΔW`` while training.
        module_dropout: Probability of skipping this adapter on this module while training.
        tensor_names: The PEFT tensor names this layer holds (a subset of
            :attr:`peft_suffixes`, which lists every name the type may use).
    """

    #: Whether rank dropout divides the kept rows by the fraction kept (PEFT: LoHa always,
    #: LoKr only with ``rank_dropout_scale``); set per layer.
    rescale_rank_dropout: bool = True
    peft_suffixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: LycorisConfig, module_name: str, in_features: int, out_features: int):
        super().__init__(config, module_name, in_features, out_features)
        self.rank = config.rank_for(module_name)
        self.alpha = config.alpha_for(module_name)
        self.scale = config.scale_for(module_name)
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)
        self.tensor_names: tuple[str, ...] = ()

    # -- what a type provides --------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """The dense ``[H_out, H_in]`` change ``ΔW`` (with the scale), as PEFT's ``get_delta_weight``."""
        raise NotImplementedError

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ ΔW.T`` for rows ``x`` ``[n, H_in]`` in the adapter's dtype (no dropout)."""
        raise NotImplementedError

    # -- the generic path ------------------------------------------------------------------

    def low_rank(self) -> None:
        """Not low rank: always ``None`` (moa calls :meth:`delta`)."""

    def delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """The change to ``base_layer(x)``: ``x @ ΔW.T``, with PEFT's dropout while training.

        Args:
            x: ``[n, H_in]`` rows routed to this adapter.
            base_layer: The wrapped base layer (unused: the change does not depend on it).

        Returns:
            ``[n, H_out]`` in the adapter's dtype.
        """
        dtype = self.parameter_dtype()
        if self.training and float(torch.rand(1)) <= self.module_dropout:
            return x.new_zeros((x.shape[0], self.out_features), dtype=dtype)
        out = self.apply_delta(x.to(dtype))
        if self.training and self.rank_dropout > 0:
            out = out * self.rank_dropout_mask(out.device, out.dtype)
        return out

    def rank_dropout_mask(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One training draw of PEFT's rank-dropout mask over the ``H_out`` rows of ``ΔW``.

        A row is kept where ``rand > rank_dropout``; with :attr:`rescale_rank_dropout` the
        mask is divided by its mean (PEFT does not guard an all-dropped mask; here it stays
        zero instead of turning into NaN).
        """
        keep = (torch.rand(self.out_features) > self.rank_dropout).to(dtype)
        if self.rescale_rank_dropout:
            kept = keep.mean()
            keep = keep / kept if float(kept) > 0 else keep
        return keep.to(device)

    def parameter_dtype(self) -> torch.dtype:
        """The dtype of this layer's weights (what it computes in)."""
        return self.get_parameter(self.tensor_names[0]).dtype

    # -- PEFT tensors ----------------------------------------------------------------------

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """This layer's tensors keyed by PEFT name (``"hada_w1_a"``), for saving."""
        return {name: self.get_parameter(name).detach() for name in self.tensor_names}

    def load_peft_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved tensors in, after checking they are exactly this layer's, same shapes.

        Raises:
            AdapterShapeError: A tensor is missing or extra (e.g. LoKr factors saved for
                another ``r`` / ``decompose_both``), or has the wrong shape.
        """
        if set(tensors) != set(self.tensor_names):
            raise AdapterShapeError(
                f"Module {self.module_name!r}: the adapter file has tensors {format_choices(tensors)} but "
                f"this {type(self).__name__} (r={self.rank}{self.layout_hint()}) holds "
                f"{format_choices(self.tensor_names)}. The config does not match the weights: was the "
                f"file saved with other r / rank_pattern values, or for another adapter type?")
        for name, tensor in tensors.items():
            want = tuple(self.get_parameter(name).shape)
            if tuple(tensor.shape) != want:
                raise AdapterShapeError(
                    f"Module {self.module_name!r}: tensor {name!r} has shape {tuple(tensor.shape)} but "
                    f"this base needs {want} (in_features={self.in_features}, out_features="
                    f"{self.out_features}, r={self.rank}). The adapter was probably made for another "
                    f"base model.")
        with torch.no_grad():
            for name, tensor in tensors.items():
                param = self.get_parameter(name)
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    def layout_hint(self) -> str:
        """Extra settings that decide which tensors exist, for error messages (LoKr overrides)."""
        return ""
