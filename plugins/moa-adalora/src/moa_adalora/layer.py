"""One AdaLoRA update on one module: ``ΔW = B @ (A * E) * scaling / (ranknum + 1e-5)``.

This is PEFT's ``SVDLinear`` (``peft/tuners/adalora/layer.py``): ``A [r, H_in]`` (right
singular vectors), ``E [r, 1]`` (singular values), ``B [H_out, r]`` (left singular
vectors), ``scaling = lora_alpha`` (``r`` if ``lora_alpha <= 0``) and ``ranknum`` the
rank *before* pruning (PEFT keeps it when it cuts a loaded module to its saved rank), held
in float32 as PEFT does.

The update is low rank with factors ``(E * A, B)``, so :meth:`AdaLoraLayer.low_rank` hands
those to moa's batched kernels and AdaLoRA rows share one shrink/expand with LoRA rows.
``E * A`` is computed from the parameters, hence ``low_rank_is_computed``: moa asks again on
each forward; outside autograd the product is cached until ``E`` or ``A`` change.

While the rank allocator trains the adapter, pruned ranks stay in memory with ``E`` zeroed
(as in PEFT) and :attr:`AdaLoraLayer.rank_mask` records which rows are kept; saving cuts the
tensors to those rows, PEFT's saved form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from moa.adapters.base import AdapterLayer

from moa_adalora.config import AdaLoraConfig


def peft_ranknum(init_r: int) -> float:
    """``ranknum + 1e-5`` as PEFT computes it (a float32 parameter plus ``1e-5``, in float32)."""
    return float(torch.tensor(float(init_r), dtype=torch.float32) + 1e-5)


class AdaLoraLayer(AdapterLayer):
    """AdaLoRA's ``A``, ``E``, ``B`` on one module (PEFT's tensor names and shapes).

    Args:
        config: The adapter's :class:`~moa_adalora.AdaLoraConfig`.
        module_name: Full name of the target module.
        in_features: The base layer's input width.
        out_features: The base layer's output width.

    Attributes:
        rank: Rows of ``A`` / ``E`` (columns of ``B``) held now: ``init_r``, or the saved
            rank of a module the config's ``rank_pattern`` pruned (possibly 0).
        scale: ``scaling / (init_r + 1e-5)``, the factor on ``B @ (A * E)``.
        rank_mask: While the allocator trains: which of the :attr:`rank` rows are kept
            (saving keeps only those); ``None``: all of them.
    """

    peft_suffixes: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_E")
    low_rank_is_computed: ClassVar[bool] = True

    def __init__(self, config: AdaLoraConfig, module_name: str, in_features: int, out_features: int):
        super().__init__(config, module_name, in_features, out_features)
        mask = config.mask_for(module_name)
        rank = sum(mask) if mask is not None else int(config.init_r)
        self.rank = rank
        self.init_r = int(config.init_r)
        scaling = float(config.lora_alpha) if config.lora_alpha > 0 else float(rank)
        self.scale = scaling / peft_ranknum(self.init_r)
        self.dropout = float(config.lora_dropout)
        self.rank_mask: list[bool] | None = None
        # PEFT draws A, E, B from randn (in this order) before its initialisation
        self.lora_A = nn.Parameter(torch.randn(rank, in_features))
        self.lora_E = nn.Parameter(torch.randn(rank, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, rank))
        if config.init_lora_weights:
            self.reset_parameters()
        self._product: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        """PEFT's initialisation: ``E = 0`` (the identity), ``A`` and ``B`` normal with std 0.02."""
        with torch.no_grad():
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(E * A [r, H_in], B [H_out, r], scale)``: the update is ``scale * B @ (E * A)``.

        Under autograd with trainable ``A`` or ``E``, a fresh product in the current graph;
        otherwise one cached product, recomputed only when ``A`` or ``E`` changed.
        """
        lora_a, lora_e = self.lora_A, self.lora_E
        if torch.is_grad_enabled() and (lora_a.requires_grad or lora_e.requires_grad):
            return lora_a * lora_e, self.lora_B, self.scale
        key = (lora_a.data_ptr(), lora_a._version, lora_e.data_ptr(), lora_e._version, lora_a.dtype, lora_a.device)
        cached = self._product
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, lora_a * lora_e)
            self._product = cached
        return cached[1], self.lora_B, self.scale

    def dropout_p(self) -> float:
        """The input dropout probability (applied in training only)."""
        return self.dropout

    def delta_weight(self) -> torch.Tensor:
        """The dense ``[H_out, H_in]`` change: ``B @ (A * E) * scale`` (PEFT's ``get_delta_weight``)."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scale

    # -- PEFT tensors ----------------------------------------------------------------------

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """``lora_A``, ``lora_B``, ``lora_E``, cut to the kept rows when :attr:`rank_mask` is set."""
        tensors = {"lora_A": self.lora_A.detach(), "lora_B": self.lora_B.detach(), "lora_E": self.lora_E.detach()}
        if self.rank_mask is None:
            return tensors
        keep = torch.tensor(self.rank_mask, dtype=torch.bool, device=self.lora_A.device)
        return {"lora_A": tensors["lora_A"][keep], "lora_B": tensors["lora_B"][:, keep],
                "lora_E": tensors["lora_E"][keep]}

    def load_peft_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved tensors in (names and shapes checked: the rank comes from ``rank_pattern``)."""
        super().load_peft_state_dict(tensors)
        self.rank_mask = None

    def extra_repr(self) -> str:
        return f"module={self.module_name!r}, rank={self.rank}, init_r={self.init_r}, scale={self.scale:g}"
