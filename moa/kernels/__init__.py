"""Kernel dispatch: ``MOA_KERNEL_BACKEND=auto|torch|triton``.

``auto`` (the default) runs Triton on CUDA tensors when triton is installed and torch
elsewhere. ``torch`` always runs the reference. ``triton`` always runs Triton (on the
CPU only under ``TRITON_INTERPRET=1``, for testing). Both backends expose the same
functions with the same signatures (see ``moa/kernels/reference``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from moa.errors import BackendUnavailableError, format_choices
from moa.kernels.metadata import LoraStack, PackedLora, RoutingMetadata, build_metadata

BACKENDS = ("auto", "torch", "triton")
_ENV = "MOA_KERNEL_BACKEND"
_modules: dict[str, ModuleType] = {}


def triton_usable_on(device: torch.device) -> bool:
    """Whether the Triton backend can run on ``device`` (CUDA, or CPU when interpreted)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def available_backends() -> list[str]:
    """Backends that can run in this process, on some device."""
    names = ["torch"]
    if importlib.util.find_spec("triton") is not None:
        names.append("triton")
    return names


def requested_backend() -> str:
    """The backend asked for by ``MOA_KERNEL_BACKEND`` (default ``auto``)."""
    name = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"{_ENV}={name!r} is not a kernel backend. Choices: {format_choices(BACKENDS)}."
        )
    return name


def _backend_module(name: str) -> ModuleType:
    if name not in _modules:
        _modules[name] = importlib.import_module(f"moa.kernels.{'reference' if name == 'torch' else name}")
    return _modules[name]


def backend_for(device: torch.device) -> ModuleType:
    """The kernel module to use for tensors on ``device``."""
    name = requested_backend()
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_usable_on(device) else "torch"
    elif name == "triton" and not triton_usable_on(device):
        raise BackendUnavailableError(
            f"{_ENV}=triton, but Triton cannot run on {device.type!r} here "
            f"(triton installed: {importlib.util.find_spec('triton') is not None}). Available "
            f"backends: {format_choices(available_backends())}. Use a CUDA device, set "
            f"TRITON_INTERPRET=1 to interpret on the CPU, or set {_ENV}=torch."
        )
    return _backend_module(name)


def lora_shrink(x: torch.Tensor, stack: LoraStack, meta: RoutingMetadata) -> torch.Tensor:
    """Dispatching twin of :func:`moa.kernels.reference.lora_shrink`."""
    return backend_for(x.device).lora_shrink(x, stack, meta)


def lora_expand(
    h: torch.Tensor, stack: LoraStack, meta: RoutingMetadata, out: torch.Tensor
) -> torch.Tensor:
    """Dispatching twin of :func:`moa.kernels.reference.lora_expand`."""
    return backend_for(out.device).lora_expand(h, stack, meta, out)


__all__ = [
    "BACKENDS",
    "LoraStack",
    "PackedLora",
    "RoutingMetadata",
    "available_backends",
    "backend_for",
    "build_metadata",
    "lora_expand",
    "lora_shrink",
    "requested_backend",
    "triton_usable_on",
]
