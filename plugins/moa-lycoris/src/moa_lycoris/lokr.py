"""LoKr: low-rank Kronecker product adaptation (KronA / LyCORIS), as PEFT does it.

The linear module's widths are factored as PEFT's :func:`factorization` does,
``H_out = a·b`` and ``H_in = c·d``, and the change is::

    ΔW = kron(w1, w2) * alpha / r          w1 [a, c],  w2 [b, d]

where either factor may itself be stored as a rank-``r`` product: ``w1 = w1_a @ w1_b`` when
``decompose_both`` is set and ``r < max(a, c) / 2``, and ``w2 = w2_a @ w2_b`` when
``r < max(b, d) / 2`` (PEFT's rules). Tensors are saved as PEFT names them,
``base_model.model.<module>.lokr_w1`` (or ``lokr_w1_a`` + ``lokr_w1_b``) and ``lokr_w2`` (or
``lokr_w2_a`` + ``lokr_w2_b``). PEFT's initialisation: ``w1`` (or ``w1_a``) zero, the rest
Kaiming-uniform, so a new adapter is the identity; ``"lycoris"`` zeroes ``w2`` (or ``w2_b``)
instead; ``False`` makes everything random.

``x @ ΔW.T`` never needs ``ΔW``: with a row ``x`` viewed as ``X [c, d]``,
``kron(w1, w2) vec(X) = vec(w1 X w2ᵀ)`` (row-major ``vec``), which
:func:`kron_apply_factored` computes for all rows at once; :meth:`LoKrLayer.apply_delta`
uses it on every layer but small ones (:func:`kron_is_cheaper`; see the benchmark in this package).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moa.adapters.base import short
from moa.errors import AdapterConfigError
from moa_lycoris.config import LycorisConfig
from moa_lycoris.layer import LycorisLayer

LOKR_TENSORS: tuple[str, ...] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclasses.dataclass
class LoKrConfig(LycorisConfig):
    """LoKr hyper-parameters; the same names, defaults and meaning as ``peft.LoKrConfig``.

    Attributes:
        r: Rank of the factors stored as products (see the module docstring).
        alpha: Scale numerator: scale = ``alpha / r``.
        decompose_both: Also store the left factor ``w1`` as a rank-``r`` product (when
            ``r < max(a, c) / 2``).
        decompose_factor: ``-1``: factor each width into two numbers near its square root;
            a positive ``f`` that divides the width: ``(f, width / f)`` (PEFT's
            :func:`factorization`).
        rank_dropout_scale: Divide the rows kept by rank dropout by the fraction kept
            (PEFT's LoKr does so only when this is set).
        init_weights: ``True`` (``w1`` zero: the identity), ``"lycoris"`` (``w2`` zero: the
            identity, LyCORIS' way) or ``False`` (all random; for tests).
        The other fields: see :class:`~moa_lycoris.config.LycorisConfig`.

    Example::

        from moa_lycoris import LoKrConfig

        model.add_adapter("math", LoKrConfig(r=4, alpha=8, decompose_both=True,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    """

    adapter_type: ClassVar[str] = "lokr"
    peft_type: ClassVar[str] = "LOKR"
    init_weights_choices: ClassVar[tuple[Any, ...]] = (True, False, "lycoris")

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def validate(self) -> None:
        """The shared checks, plus ``decompose_both``, ``decompose_factor``, ``rank_dropout_scale``."""
        super().validate()
        for key in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, key), bool):
                raise AdapterConfigError(f"LoKr field {key} = {short(getattr(self, key))} must be true or false.")
        factor = self.decompose_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or not (factor == -1 or factor >= 1):
            raise AdapterConfigError(
                f"LoKr decompose_factor must be -1 (split each width near its square root) or a positive "
                f"integer; got {short(factor)}.")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension``, exactly as PEFT's LoKr does.

    Args:
        dimension: The width to split.
        factor: ``-1``: ``m <= n`` as close to each other as possible (``m + n`` smallest
            found by walking up the divisors). A positive ``factor`` dividing ``dimension``:
            ``(factor, dimension // factor)``. Another positive ``factor``: the closest pair
            with ``m <= factor``.

    Returns:
        ``(m, n)``; ``m <= n`` except in the dividing case.

    Example::

        factorization(256) == (16, 16); factorization(128) == (8, 16); factorization(128, 4) == (4, 32)
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


#: Layers with fewer weights than this (``H_out·H_in``) build ``ΔW``: it is cheap, and the batched
#: small matrix products of the Kronecker form cost more than they save (measured with
#: ``benchmarks/delta_forms.py``: 64x64 and 32x64 layers are faster dense, 128x128 and up not).
SMALL_LAYER = 128 * 128


def kron_is_cheaper(in_features: int, out_features: int) -> bool:
    """Whether :func:`kron_apply_factored` should beat building ``ΔW``: for any layer not small.

    The Kronecker form costs ``n·c·b·(a + d)`` multiply-adds against ``a·b·c·d`` (build) plus
    ``n·a·b·c·d`` for the dense form, so it wins by a factor near ``sqrt(H)`` on real layers; on
    layers below :data:`SMALL_LAYER` weights the fixed cost of its extra operations dominates.
    """
    return in_features * out_features >= SMALL_LAYER


def kron_delta_weight(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """``kron(w1, w2) * scale``, PEFT's ``make_kron``, ``[a·b, c·d]``."""
    return torch.kron(w1, w2.contiguous()) * scale


def kron_apply_dense(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ ΔW.T`` by building ``ΔW`` first (what PEFT's forward does)."""
    return F.linear(x, kron_delta_weight(w1, w2, scale))


def kron_apply_factored(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """``x @ kron(w1, w2).T * scale`` as ``w1 @ X @ w2.T`` per row, never building ``ΔW``.

    ``kron(w1, w2)[p·b + q, i·d + j] = w1[p, i] · w2[q, j]``, so for a row ``x`` viewed as
    ``X[i, j] = x[i·d + j]`` the output is ``Y[p, q] = Σ_ij w1[p, i] X[i, j] w2[q, j]``.
    """
    rows = x.shape[0]
    (a, c), (b, d) = w1.shape, w2.shape
    inner = F.linear(x.reshape(rows, c, d), w2)  # [n, c, b]
    return torch.matmul(w1, inner).reshape(rows, a * b) * scale


class LoKrLayer(LycorisLayer):
    """One LoKr adapter on one linear module.

    Which tensors exist follows PEFT (see the module docstring); :attr:`tensor_names` lists
    them. ``rank_pattern`` changes ``r`` per module, and so may change which factors are
    stored as products.

    Args:
        config: The adapter's :class:`LoKrConfig`.
        module_name: Full name of the target module.
        in_features: The base layer's input width ``c·d``.
        out_features: The base layer's output width ``a·b``.

    Attributes:
        out_split: ``(a, b)``, PEFT's ``factorization(H_out, decompose_factor)``.
        in_split: ``(c, d)``, PEFT's ``factorization(H_in, decompose_factor)``.
        full_w1: Whether ``w1 [a, c]`` is stored whole (else ``w1_a [a, r] @ w1_b [r, c]``).
        full_w2: Whether ``w2 [b, d]`` is stored whole (else ``w2_a [b, r] @ w2_b [r, d]``).
    """

    peft_suffixes: ClassVar[tuple[str, ...]] = LOKR_TENSORS

    def __init__(self, config: LoKrConfig, module_name: str, in_features: int, out_features: int):
        super().__init__(config, module_name, in_features, out_features)
        rank = self.rank
        self.decompose_both = bool(config.decompose_both)
        self.rescale_rank_dropout = bool(config.rank_dropout_scale)
        self.out_split = factorization(out_features, config.decompose_factor)
        self.in_split = factorization(in_features, config.decompose_factor)
        (a, b), (c, d) = self.out_split, self.in_split
        self.full_w1 = not (self.decompose_both and rank < max(a, c) / 2)
        self.full_w2 = not rank < max(b, d) / 2
        names: list[str] = []
        if self.full_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
            names.append("lokr_w1")
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, c))
            names += ["lokr_w1_a", "lokr_w1_b"]
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d))
            names.append("lokr_w2")
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, d))
            names += ["lokr_w2_a", "lokr_w2_b"]
        self.tensor_names = tuple(names)
        self.reset_parameters(config.init_weights)

    def reset_parameters(self, init: bool | str = True) -> None:
        """PEFT's initialisation (same tensors zeroed, same order of random draws)."""
        if init is False:
            zero: set[str] = set()
        elif init == "lycoris":
            zero = {"lokr_w2", "lokr_w2_b"}
        else:
            zero = {"lokr_w1", "lokr_w1_a"}
        with torch.no_grad():
            for name in self.tensor_names:
                if name in zero:
                    nn.init.zeros_(self.get_parameter(name))
                else:
                    nn.init.kaiming_uniform_(self.get_parameter(name), a=math.sqrt(5))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1 [a, c], w2 [b, d])``, multiplying out the factors stored as products."""
        w1 = self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.full_w2 else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = kron(w1, w2) * scale``, ``[H_out, H_in]``; what a merge folds in."""
        return kron_delta_weight(*self.factors(), self.scale)

    def apply_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ ΔW.T`` for ``x [n, H_in]``: the Kronecker identity, or ``ΔW`` on a small layer."""
        if kron_is_cheaper(self.in_features, self.out_features):
            return kron_apply_factored(x, *self.factors(), self.scale)
        return kron_apply_dense(x, *self.factors(), self.scale)

    def layout_hint(self) -> str:
        """``decompose_both`` and the width splits, which decide the stored tensors."""
        return (f", decompose_both={self.decompose_both}, H_out={self.out_split[0]}x{self.out_split[1]}, "
                f"H_in={self.in_split[0]}x{self.in_split[1]}")

    def extra_repr(self) -> str:
        return (f"module={self.module_name!r}, rank={self.rank}, scale={self.scale:g}, "
                f"w1={'full' if self.full_w1 else 'a@b'}, w2={'full' if self.full_w2 else 'a@b'}")
