"""Triton kernels: the CUDA production path (and, under ``TRITON_INTERPRET=1``, a CPU test path).

Same file names and function signatures as :mod:`moa.kernels.reference`; the reference's
``Semantics:`` blocks are the contract. Kernels follow Punica's SGMV/BGMV and S-LoRA
(tokens grouped by adapter through the shared metadata, one launch per op for the whole
batch); the per-token top-k *weighted* mixture inside the kernel is moa's addition.

Sibling projections (q/k/v, gate/up) are not fused: the default base (Llama) keeps them
as separate modules, so the base does not fuse them and neither do we.

Importing this package without triton installed raises
:class:`~moa.errors.BackendUnavailableError`; :mod:`moa.kernels` imports it only when
the triton backend is selected.
"""

from __future__ import annotations

from moa.errors import BackendUnavailableError

try:
    import triton  # noqa: F401
except ImportError as exc:
    raise BackendUnavailableError(
        f"The triton kernel backend needs the 'triton' package, which did not import ({exc}). "
        "Available backends: torch. Install triton (it comes with CUDA builds of torch) or "
        "set MOA_KERNEL_BACKEND=torch."
    ) from exc

from moa.kernels.triton.lora_expand import lora_expand  # noqa: E402
from moa.kernels.triton.lora_shrink import lora_shrink  # noqa: E402

__all__ = ["lora_expand", "lora_shrink"]
