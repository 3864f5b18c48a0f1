"""The largest adapter and router weights moa uses: finite is not enough, they must stay finite in a forward.

A file can hold finite but huge values (a corrupt byte turns 0.01 into 3e38, or a training
run diverged without reaching infinity): they pass the NaN/infinity check and overflow in the
first forward. So moa bounds each weight tensor's *gain* by what its compute dtype can carry.

**The rule.** A tensor ``W`` of compute dtype ``D`` used with fan-in ``n`` (the size of its last
dimension for a matrix, 1 for a vector such as IA3's scaling) has the gain
``g = n * max|W|``; the factor that carries an adapter's scale (LoRA's ``B``) counts it too
(``g = r * max|B| * scale``). moa refuses a tensor whose gain exceeds
``G(D) = finfo(D).max ** 0.25`` — about 4.3e9 in float32 and bfloat16. An adapter applies at
most two such factors in a row (``A`` then ``B``), so its whole gain stays below
``finfo(D).max ** 0.5`` and every input below ``finfo(D).max ** 0.5`` in magnitude (1.8e19 in
float32) gives a finite output. Trained adapters have gains of order 1 to 1,000 (the shipped
ones: at most 197, on ``lora_A`` of the French adapter), so the bound leaves them more than six
orders of magnitude of room.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from moa.errors import AdapterFormatError, MoaError


def gain_bound(dtype: torch.dtype) -> float:
    """``finfo(dtype).max ** 0.25``: the largest gain :func:`check_gain` accepts in ``dtype``."""
    return float(torch.finfo(dtype).max) ** 0.25


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype moa computes with for a weight stored as ``tensor`` (at least float32)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def check_gain(name: str, tensor: torch.Tensor, source: str, *, dtype: torch.dtype, scale: float = 1.0,
               error_class: type[MoaError] = AdapterFormatError) -> None:
    """Raise ``error_class`` if ``tensor``'s gain (see the module docstring) exceeds :func:`gain_bound`.

    Args:
        name: The tensor's name in its file (named in the error).
        tensor: A floating-point weight.
        source: The file it came from (named in the error).
        dtype: The dtype it is computed in.
        scale: The factor applied with it (LoRA's ``alpha / r`` for ``B``).
        error_class: The :class:`~moa.errors.MoaError` raised.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    largest = float(tensor.detach().abs().max())
    fan_in = int(tensor.shape[-1]) if tensor.dim() >= 2 else 1
    gain = fan_in * largest * abs(float(scale))
    bound = gain_bound(dtype)
    if not gain <= bound:
        raise error_class(
            f"{source}: tensor {name!r} holds values up to {largest:.3g}; with fan-in {fan_in}"
            f"{f' and scale {scale:.3g}' if scale != 1.0 else ''} its gain is {gain:.3g}, above {bound:.3g}, the "
            f"most moa can use safely in {str(dtype).removeprefix('torch.')} (finfo.max ** 0.25: larger values "
            f"overflow in a forward). Nothing was loaded. The file is corrupt or the training diverged: "
            f"download or save it again."
        )


def check_layer_gains(layer: object, keys: Mapping[str, str], source: str) -> None:
    """:func:`check_gain` on every tensor of an adapter layer, the low-rank scale on its ``B`` factor.

    Args:
        layer: An :class:`~moa.adapters.base.AdapterLayer` with its weights loaded.
        keys: PEFT suffix (``"lora_B.weight"``) -> the tensor's full name in the file.
        source: The file the weights came from.
    """
    low_rank = layer.low_rank()
    scaled = None if low_rank is None else low_rank[1]
    for suffix, tensor in layer.peft_state_dict().items():
        scale = float(low_rank[2]) if scaled is not None and tensor.data_ptr() == scaled.data_ptr() else 1.0
        check_gain(keys.get(suffix, suffix), tensor, source, dtype=compute_dtype(tensor), scale=scale)


__all__ = ["check_gain", "check_layer_gains", "compute_dtype", "gain_bound"]
