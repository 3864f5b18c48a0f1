"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., 2024), as PEFT implements it.

All modules of a VeRA adapter share two frozen random matrices, ``A [r, max_in]`` and
``B [max_out, r]`` (:mod:`moa_vera.projection`); each module trains only two vectors,
``vera_lambda_d [r]`` and ``vera_lambda_b [H_out]``::

    delta(x) = lambda_b ⊙ (B[:H_out] @ (lambda_d ⊙ (A[:, :H_in] @ x)))

On disk it is PEFT's layout: per module ``base_model.model.<module>.vera_lambda_b`` and
``.vera_lambda_d``, plus, once per adapter, ``base_model.vera_A`` and ``base_model.vera_B``
when ``save_projection`` is true (moa's adapter-level tensors,
``AdapterLayer.shared_peft_keys``); without them the matrices are drawn again from
``projection_prng_key`` exactly as PEFT draws them.

By default VeRA adapters take moa's generic path: each holds only its vectors, and the
projection once. moa hands one module's VeRA rows to :meth:`VeraLayer.grouped_delta` in one
call, and the adapters that share a projection are computed together, one shrink by ``A``
and one expand by ``B`` over all their rows (:mod:`moa_vera.grouped`); an adapter alone with
its projection takes :meth:`VeraLayer.delta`. VeRA is also low rank, with
``A' = lambda_d ⊙ A`` and ``B' = lambda_b ⊙ B`` (scale 1); with ``VeraLayer.batched = True``
its rows ride moa's batched low-rank kernels instead, the two products computed from the
parameters (``low_rank_is_computed``): kept while the vectors are unchanged, made again in
the autograd graph while training. Either way VeRA rows share a batch with LoRA, DoRA, IA3
and base rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moa.adapters.base import AdapterConfig, AdapterLayer
from moa.errors import AdapterConfigError, AdapterFormatError
from moa_vera.config import VeraConfig
from moa_vera.grouped import grouped_vera_delta
from moa_vera.projection import VeraProjection

if TYPE_CHECKING:
    from moa.adapters.base import GroupedRows

logger = logging.getLogger(__name__)

#: Whether this moa asks ``low_rank_is_computed`` layers for fresh factors on every forward; without
#: that, the factors of the batched path would go stale once the vectors change (training).
_CORE_RECOMPUTES_FACTORS = hasattr(AdapterLayer, "low_rank_is_computed")

#: The adapter-level tensor names PEFT saves (its adapter name stripped).
VERA_A_KEY = "base_model.vera_A"
VERA_B_KEY = "base_model.vera_B"


class VeraLayer(AdapterLayer):
    """One VeRA adapter on one module: two trainable vectors and a view of the shared projection.

    Args:
        config: The adapter's :class:`~moa_vera.VeraConfig`; every layer built from the
            same config object shares one :class:`~moa_vera.VeraProjection`.
        module_name: Full name of the target module.
        in_features: The base layer's input width.
        out_features: The base layer's output width.

    Attributes:
        vera_lambda_d: ``[r]``, scales the projection's rank dimension.
        vera_lambda_b: ``[H_out]``, scales the output.
        projection: The adapter's shared frozen matrices (not parameters, not buffers:
            held once however many modules and adapters use them).
        batched_path: :attr:`batched` as it was when this layer was built.
    """

    peft_suffixes: ClassVar[tuple[str, ...]] = ("vera_lambda_b", "vera_lambda_d")
    shared_peft_keys: ClassVar[tuple[str, ...]] = (VERA_A_KEY, VERA_B_KEY)
    low_rank_is_computed: ClassVar[bool] = True
    #: ``False`` (the default): moa's generic path (:meth:`grouped_delta`, :meth:`delta`),
    #: which holds only the vectors and the shared projection. ``True``: rows ride the batched
    #: low-rank kernels through :meth:`low_rank`, which holds ``lambda ⊙ A`` and ``lambda ⊙ B``
    #: per module: as much memory as a LoRA adapter of rank ``r``. On CPUs the generic path
    #: measured faster (``benchmarks/vera_vs_lora.py``). Read when a layer is
    #: built: set it before adding or loading adapters. Needs a moa whose layers ask
    #: ``low_rank_is_computed`` layers for fresh factors on every forward; on an older moa
    #: the generic path is used whatever this says.
    batched: ClassVar[bool] = False

    def __init__(self, config: VeraConfig, module_name: str, in_features: int, out_features: int):
        super().__init__(config, module_name, in_features, out_features)
        self.r = int(config.r)
        # fixed per layer: a layer never switches paths (moa caches each adapter's path per layout)
        self.batched_path = bool(self.batched) and _CORE_RECOMPUTES_FACTORS
        self.dropout = float(config.vera_dropout)
        self.projection = VeraProjection.of(config)
        self.projection.register(in_features, out_features, module_name)
        if config.init_weights:  # PEFT: lambda_b = 0 (the identity), lambda_d = d_initial
            lambda_b, lambda_d = torch.zeros(out_features), torch.full((self.r,), float(config.d_initial))
        else:
            lambda_b, lambda_d = torch.ones(out_features), torch.randn(self.r)
        self.vera_lambda_b = nn.Parameter(lambda_b)
        self.vera_lambda_d = nn.Parameter(lambda_d)
        self._products: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- the math --------------------------------------------------------------------------

    def _slices(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projection.slices(self.in_features, self.out_features, self.vera_lambda_d.device, dtype)

    def attach_base(self, base_layer: nn.Module) -> None:
        """Fix the projection's widths: every layer of the adapter exists once it is installed."""
        self.projection.fix()

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(lambda_d ⊙ A[:, :H_in], lambda_b ⊙ B[:H_out], 1.0)``, or ``None`` (see below).

        The same tensors are returned while the vectors are unchanged (outside autograd),
        so the kernels' packed buffers are reused; a forward that trains the vectors gets
        fresh products in its graph. ``None`` on the generic path (:attr:`batched` false, the
        default) and while the adapter is still being built (its projection's widths not yet
        fixed); the merge code then uses :meth:`delta_weight`.
        """
        if not self.batched_path or not self.projection.fixed:
            return None
        lambda_d, lambda_b = self.vera_lambda_d, self.vera_lambda_b
        tracking = torch.is_grad_enabled() and (lambda_d.requires_grad or lambda_b.requires_grad)
        pair = self.projection.pair()
        key = (id(pair), lambda_d.device, lambda_d.dtype, lambda_d._version, lambda_d.data_ptr(),
               lambda_b._version, lambda_b.data_ptr())
        cached = self._products
        if not tracking and cached is not None and cached[0] == key:
            return (*cached[1], 1.0)
        vera_a, vera_b = self._slices(lambda_d.dtype)
        with torch.set_grad_enabled(tracking):
            products = (lambda_d[:, None] * vera_a, lambda_b[:, None] * vera_b)
        self._products = None if tracking else (key, products)
        return (*products, 1.0)

    def delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """``lambda_b ⊙ (B (lambda_d ⊙ (A dropout(x))))`` for rows ``x`` ``[n, H_in]`` (PEFT's forward).

        Used on the generic path (the default, :meth:`low_rank` ``None``) for an adapter alone
        with its projection among a module's routed VeRA adapters; the others go through
        :meth:`grouped_delta`, which gives the same rows.

        Args:
            x: ``[n, H_in]`` rows routed to this adapter.
            base_layer: The wrapped base layer (unused: VeRA does not depend on it).

        Returns:
            ``[n, H_out]`` in the vectors' dtype.
        """
        lambda_d = self.vera_lambda_d
        vera_a, vera_b = self._slices(lambda_d.dtype)
        if self.training and self.dropout > 0:
            x = F.dropout(x, p=self.dropout, training=True)
        return self.vera_lambda_b * F.linear(lambda_d * F.linear(x.to(lambda_d.dtype), vera_a), vera_b)

    @classmethod
    def grouped_delta(cls, x: torch.Tensor, rows: GroupedRows, base_layer: nn.Module) -> torch.Tensor | None:
        """All of one module's VeRA pairs at once: one shrink and one expand per shared projection.

        moa's grouped hook (``AdapterLayer.grouped_delta``; an older moa never calls it and
        uses :meth:`delta` per adapter). Equal to :meth:`delta` per adapter up to the GEMMs'
        summation order (:func:`moa_vera.grouped.grouped_vera_delta`).

        Args:
            x: ``[T, H_in]``, every row at this module.
            rows: The pairs routed to this module's VeRA adapters, grouped by adapter.
            base_layer: The wrapped base layer (unused).

        Returns:
            ``[rows.num_pairs, H_out]`` unweighted deltas, or ``None`` (training with
            dropout, or no two adapters sharing a projection): moa then calls :meth:`delta`.
        """
        return grouped_vera_delta(x, rows, base_layer)

    def delta_weight(self) -> torch.Tensor:
        """The dense change ``(lambda_b ⊙ B) @ (lambda_d ⊙ A)``, ``[H_out, H_in]`` float32 (for merging)."""
        with torch.no_grad():
            vera_a, vera_b = self._slices(torch.float32)
            lambda_b = self.vera_lambda_b.detach().float()[:, None]
            lambda_d = self.vera_lambda_d.detach().float()[:, None]
            return (lambda_b * vera_b) @ (lambda_d * vera_a)

    def dropout_p(self) -> float:
        """``vera_dropout`` (applied to the input while training)."""
        return self.dropout

    # -- adapter-level tensors -------------------------------------------------------------

    @classmethod
    def shared_peft_state_dict(cls, config: AdapterConfig, layers: Mapping[str, AdapterLayer]
                               ) -> dict[str, torch.Tensor]:
        """``base_model.vera_A`` / ``vera_B`` (full, float32) when ``config.save_projection``, else none."""
        if not getattr(config, "save_projection", True):
            return {}
        projection = _projection_of(layers)
        pair = projection.pair()
        return {VERA_A_KEY: pair.vera_a, VERA_B_KEY: pair.vera_b}

    @classmethod
    def load_shared_peft_state_dict(cls, config: AdapterConfig, layers: Mapping[str, AdapterLayer],
                                    tensors: Mapping[str, torch.Tensor]) -> None:
        """Take the file's projections, or (``save_projection`` false) draw them as PEFT does.

        Raises:
            AdapterFormatError: ``save_projection`` is true but the file lacks them.
            AdapterShapeError: Their shapes do not fit the adapter's modules.
        """
        projection = _projection_of(layers)
        if getattr(config, "save_projection", True):
            missing = [key for key in cls.shared_peft_keys if key not in tensors]
            if missing:
                raise AdapterFormatError(
                    f"adapter_config.json says save_projection=true, but the weights file has no {missing} (PEFT "
                    f"refuses it too). Set save_projection to false in adapter_config.json to draw the projections "
                    f"from projection_prng_key={getattr(config, 'projection_prng_key', 0)}, or re-save the adapter.")
            projection.load(tensors[VERA_A_KEY], tensors[VERA_B_KEY])
        else:
            if tensors:  # PEFT ignores them too (its projection buffers are then not loaded)
                logger.warning("The VeRA weights file holds %s but adapter_config.json says save_projection=false: "
                               "they are ignored and the projections drawn from projection_prng_key=%s, as PEFT "
                               "does.", sorted(tensors), getattr(config, "projection_prng_key", 0))
            projection.fix()

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, r={self.r}, prng_key={self.projection.prng_key}"


def _projection_of(layers: Mapping[str, Any]) -> VeraProjection:
    """The one projection every layer of an adapter shares."""
    projections = {id(layer.projection): layer.projection for layer in layers.values()}
    if len(projections) != 1:
        raise AdapterConfigError(
            f"A VeRA adapter's layers must share one projection (built from one VeraConfig); these {len(layers)} "
            f"layers have {len(projections)}. Build them with model.add_adapter or model.load_adapter.")
    return next(iter(projections.values()))
