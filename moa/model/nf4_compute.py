"""The dtype NF4 layers compute in: float32 by default, bfloat16 where speed matters more than exactness.

bitsandbytes' ``Linear4bit`` multiplies by dequantizing its weight to the layer's compute
dtype and calling an ordinary matmul. With float32 compute (moa's default on CPU) a decode
step on the NF4 base costs 1.1x to 1.5x the float32 base's (``benchmarks/nf4_cpu.py``):
the dequantized float32 weight is as many bytes as the dense one, plus the dequantization.
On a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX), bfloat16 compute writes half
the bytes and the matmul runs at about twice the rate, so a step costs close to what the
float32 base costs (1.05x); bfloat16 compute is also what QLoRA uses.

It is not the default because a bfloat16 matmul rounds its output to bfloat16: the same
row computed in batches of different sizes can then differ in the last bf16 bit (about
1e-4 of a logit), where float32 compute keeps a row of a mixed batch equal to the row alone
to 1e-5, which moa's batching guarantees rest on. Opt in with ``load_base(...,
compute_dtype=torch.bfloat16)``, :func:`set_nf4_compute_dtype` on a loaded model, or
``MOA_NF4_COMPUTE_DTYPE=bfloat16`` (``auto``: bfloat16 only where the CPU has native bf16)
for every load, ``moa serve`` and ``moa demo`` included.

Only the quantized layers' matmuls change dtype: their inputs are cast to bfloat16 and
their outputs back to the model's dtype, so embeddings, norms, attention, the LM head and
every adapter still run in float32.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from moa.errors import UnsupportedQuantizationError

from moa.model.targets import is_quantized_linear


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (bitsandbytes' own check: AVX512-BF16)."""
    bnb = sys.modules.get("bitsandbytes")
    check = getattr(getattr(bnb, "functional", None), "has_avx512bf16", None)
    return bool(check()) if callable(check) else False


ENV_VAR = "MOA_NF4_COMPUTE_DTYPE"
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_nf4_compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The compute dtype ``load_base`` gives NF4 layers when none is passed.

    ``MOA_NF4_COMPUTE_DTYPE`` when set (``bfloat16``, ``float32``, ``float16``, or ``auto``:
    bfloat16 for a float32 model on a CPU with native bf16, else ``dtype``); otherwise ``dtype``.

    Args:
        device: Where the model runs.
        dtype: The model's dense dtype.

    Returns:
        The compute dtype.

    Raises:
        UnsupportedQuantizationError: ``MOA_NF4_COMPUTE_DTYPE`` holds something else (the message lists the choices).
    """
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return dtype
    if value == "auto":
        native = device.type == "cpu" and dtype == torch.float32 and cpu_has_native_bf16()
        return torch.bfloat16 if native else dtype
    if value not in _NAMES:
        raise UnsupportedQuantizationError(f"{ENV_VAR}={value!r} is not a compute dtype; choose one of "
                         f"{sorted([*_NAMES, 'auto'])}, or unset it for the model's own dtype.")
    return _NAMES[value]


def set_nf4_compute_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Make every bitsandbytes 4-bit layer in ``model`` compute in ``dtype``.

    Args:
        model: Any module holding ``Linear4bit`` layers (a base, or a ``MixtureModel``).
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.

    Returns:
        The number of layers changed.

    Raises:
        UnsupportedQuantizationError: ``dtype`` is not a floating dtype bitsandbytes computes in.
    """
    choices = (torch.float32, torch.bfloat16, torch.float16)
    if dtype not in choices:
        raise UnsupportedQuantizationError(f"NF4 compute dtype {dtype!r} is not one of {choices}; pass one of those.")
    count = 0
    for module in model.modules():
        if is_quantized_linear(module):
            module.compute_dtype = dtype
            module.compute_type_is_set = True  # else bitsandbytes resets it from the first input's dtype
            count += 1
    return count


__all__ = ["ENV_VAR", "cpu_has_native_bf16", "default_nf4_compute_dtype", "set_nf4_compute_dtype"]
