"""LoHa: low-rank Hadamard product adaptation (FedPara, Hyeon-Woo et al., 2022; LyCORIS), as PEFT does it.

On a linear module of weight ``W [H_out, H_in]`` the change is::

    ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) * alpha / r

with ``w1_a, w2_a [H_out, r]`` and ``w1_b, w2_b [r, H_in]``, saved as PEFT names them:
``base_model.model.<module>.hada_w1_a`` (``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``). PEFT's
initialisation: ``hada_w2_b`` zero and the other three Kaiming-uniform, so a new adapter is
the identity; ``init_weights=False`` makes all four random.

The Hadamard product of two rank-``r`` matrices has rank at most ``r²``:
``(A1 B1) ⊙ (A2 B2) = (A1 ⊙ᵣ A2)(B1 ⊙꜀ B2)``, where ``A1 ⊙ᵣ A2 [H_out, r²]`` holds the
products of every column of ``A1`` with every column of ``A2`` and ``B1 ⊙꜀ B2 [r², H_in]``
those of the rows of ``B1`` and ``B2``. :func:`hadamard_apply_factored` uses it to compute
``x @ ΔW.T`` without building ``ΔW``; :meth:`LoHaLayer.apply_delta` picks the form by
:func:`factored_is_cheaper`, a multiply-add count checked against measurements
(``benchmarks/delta_forms.py`` in this package). Both forms are exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moa_lycoris.config import LycorisConfig
from moa_lycoris.layer import LycorisLayer

LOHA_TENSORS: tuple[str, ...] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclasses.dataclass
class LoHaConfig(LycorisConfig):
    """LoHa hyper-parameters; the same names, defaults and meaning as ``peft.LoHaConfig``.

    Attributes:
        r: Rank of each of the two factor pairs (``ΔW`` then has rank up to ``r²``).
        alpha: Scale numerator: scale = ``alpha / r``.
        init_weights: ``True`` (``hada_w2_b`` zero: the adapter starts as the identity) or
            ``False`` (all four random; for tests, as PEFT warns).
        rank_dropout: While training, each output row of ``ΔW`` is dropped with this
            probability and the kept rows divided by the fraction kept (PEFT's LoHa).
        The other fields: see :class:`~moa_lycoris.config.LycorisConfig`.

    Example::

        from moa_lycoris import LoHaConfig

        model.add_adapter("style", LoHaConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    """

    adapter_type: ClassVar[str] = "loha"
    peft_type: ClassVar[str] = "LOHA"


def hadamard_delta_weight(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """``((w1a @ w1b) ⊙ (w2a @ w2b)) * scale``, PEFT's ``make_weight``, ``[H_out, H_in]``."""
    return ((w1a @ w1b) * (w2a @ w2b)) * scale


def hadamard_apply_dense(x: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                         w2b: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ ΔW.T`` by building ``ΔW`` first (what PEFT's forward does)."""
    return F.linear(x, hadamard_delta_weight(w1a, w1b, w2a, w2b, scale))


def hadamard_apply_factored(x: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                            w2b: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ ΔW.T`` through the rank-``r1·r2`` form, never building ``ΔW``.

    ``ΔW[o, i] = Σ_{k,l} w1a[o,k] w2a[o,l] · w1b[k,i] w2b[l,i]``, so with
    ``right[(k,l), i] = w1b[k,i] w2b[l,i]`` and ``left[o, (k,l)] = w1a[o,k] w2a[o,l]``,
    ``x @ ΔW.T = (x @ right.T) @ left.T``.
    """
    r1, r2 = w1b.shape[0], w2b.shape[0]
    right = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, w1b.shape[1])
    left = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], r1 * r2)
    return F.linear(F.linear(x, right), left) * scale


#: Layers with fewer weights than this (``H_out·H_in``) build ``ΔW``: it is cheap, and the extra
#: small operations of the factored form cost more than they save (measured with
#: ``benchmarks/delta_forms.py``: 64x64 to 128x128 layers are faster dense, 256x256 and up factored).
SMALL_LAYER = 128 * 128


def factored_is_cheaper(rows: int, rank: int, in_features: int, out_features: int) -> bool:
    """Whether :func:`hadamard_apply_factored` should beat the dense form for ``rows`` rows.

    Counting multiply-adds, dense needs ``2·r·H_out·H_in`` to build the two products, then
    ``n·H_out·H_in``; factored needs ``r²·(H_in + H_out)`` to build both sides, then
    ``n·r²·(H_in + H_out)``. Two exceptions, from measurements: a small layer (below
    :data:`SMALL_LAYER` weights) and an inner rank ``r²`` above ``2·min(H_in, H_out)`` (the
    element-wise products that build the factored sides then outgrow the caches) go dense.

    Args:
        rows: Rows ``n`` of ``x``.
        rank: ``r``.
        in_features: ``H_in``.
        out_features: ``H_out``.
    """
    if in_features * out_features < SMALL_LAYER or rank * rank > 2 * min(in_features, out_features):
        return False
    dense = (2 * rank + rows) * out_features * in_features
    factored = (1 + rows) * rank * rank * (in_features + out_features)
    return factored < dense


class LoHaLayer(LycorisLayer):
    """One LoHa adapter on one linear module.

    Args:
        config: The adapter's :class:`LoHaConfig`.
        module_name: Full name of the target module.
        in_features: The base layer's input width.
        out_features: The base layer's output width.

    Attributes:
        hada_w1_a, hada_w2_a: ``[H_out, r]``.
        hada_w1_b, hada_w2_b: ``[r, H_in]``.
    """

    peft_suffixes: ClassVar[tuple[str, ...]] = LOHA_TENSORS

    def __init__(self, config: LoHaConfig, module_name: str, in_features: int, out_features: int):
        super().__init__(config, module_name, in_features, out_features)
        rank = self.rank
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, rank))
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_features))
        self.tensor_names = LOHA_TENSORS
        self.reset_parameters(config.init_weights)

    def reset_parameters(self, init: bool | str = True) -> None:
        """PEFT's initialisation: Kaiming-uniform, with ``hada_w2_b`` zero unless ``init`` is False."""
        with torch.no_grad():  # PEFT's order of random draws, so a seed gives PEFT's weights
            for name in LOHA_TENSORS:
                if name == "hada_w2_b" and init is not False:
                    nn.init.zeros_(self.hada_w2_b)
                else:
                    nn.init.kaiming_uniform_(self.get_parameter(name), a=math.sqrt(5))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1_a, w1_b, w2_a, w2_b)``."""
        return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = ((w1_a @ w1_b) ⊙ (w2_a @ w2_b)) * scale``, ``[H_out, H_in]``; what a merge folds in."""
        return hadamard_delta_weight(*self.factors(), self.scale)

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ ΔW.T`` for ``x [n, H_in]``, by the cheaper exact form for ``n`` rows."""
        if factored_is_cheaper(x.shape[0], self.rank, self.in_features, self.out_features):
            return hadamard_apply_factored(x, *self.factors(), self.scale)
        return hadamard_apply_dense(x, *self.factors(), self.scale)

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, rank={self.rank}, scale={self.scale:g}"
