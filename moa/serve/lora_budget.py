"""How many adapters ``moa serve`` keeps resident when ``--max-loras`` is not given.

Unbounded by default, a server that is asked for ever more adapters loads them until the
machine runs out of memory. The default instead sizes the cache from the memory free at
start-up on the adapters' device (free GPU memory on CUDA; ``MemAvailable`` on the host)
and the largest adapter known then::

    max_loras = clamp(ADAPTER_MEMORY_SHARE * free / (ADAPTER_COST_FACTOR * largest), floor, cap)

``ADAPTER_COST_FACTOR`` counts what one resident adapter really takes: its weights, their
rows in the kernels' packed buffers (:mod:`moa.kernels.packed_buffers`) and those buffers'
free room. ``--max-loras N`` sets the number; ``--max-loras 0`` (or ``none``) asks for no
limit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: The most adapters the default keeps resident, however much memory is free: past this,
#: each load and eviction and each layout's Python-side bookkeeping cost more than an
#: adapter reloaded on demand (set ``--max-loras`` to go beyond).
DEFAULT_MAX_LORAS_CAP = 64
#: Share of the free memory the resident adapters may take by default (the rest is the KV
#: cache's, the activations' and other processes').
ADAPTER_MEMORY_SHARE = 0.25
#: Memory one resident adapter takes, in multiples of its weights (weights + packed rows +
#: the packed buffers' free room).
ADAPTER_COST_FACTOR = 3.0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def default_max_loras(available_bytes: int | None, largest_adapter_bytes: int | None, *, floor: int = 1,
                      cap: int | None = None) -> int:
    """The default ``max_loras`` for ``available_bytes`` of free memory.

    Args:
        available_bytes: Free memory on the adapters' device (``None``: unknown).
        largest_adapter_bytes: Weights of the largest adapter known (``None`` or 0: unknown).
        floor: The least it returns (the pinned adapters plus one, so one more can load).
        cap: The most it returns (default :data:`DEFAULT_MAX_LORAS_CAP`).

    Returns:
        ``floor <= n <= max(floor, cap)``; ``cap`` when either size is unknown.
    """
    floor = max(1, int(floor))
    cap = max(floor, int(DEFAULT_MAX_LORAS_CAP if cap is None else cap))
    if not available_bytes or not largest_adapter_bytes or available_bytes <= 0 or largest_adapter_bytes <= 0:
        return cap
    fits = int(ADAPTER_MEMORY_SHARE * available_bytes // (ADAPTER_COST_FACTOR * largest_adapter_bytes))
    return min(cap, max(floor, fits))


def available_memory_bytes(device: torch.device | str | None = None) -> int | None:
    """Free memory on ``device``: the GPU's free memory on CUDA, else the host's available memory.

    The host's is psutil's ``available`` when psutil is installed, else ``MemAvailable``
    from ``/proc/meminfo``; ``None`` when neither can be read.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_adapter_bytes(model: Any, name: str) -> int:
    """Bytes of adapter ``name``'s weights in ``model`` (parameters and buffers, Linear- or input-level)."""
    if name in model.input_adapters:
        modules: Iterable[torch.nn.Module] = [model.input_adapters.get(name)]
    else:
        modules = model.adapter_layers(name).values()
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.data_ptr() not in seen:  # tensors shared between layers count once
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def weight_file_bytes(folder: str | Path) -> int:
    """Size of the weight files in a local adapter folder (0 when it is not one)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))


__all__ = [
    "ADAPTER_COST_FACTOR",
    "ADAPTER_MEMORY_SHARE",
    "DEFAULT_MAX_LORAS_CAP",
    "available_memory_bytes",
    "default_max_loras",
    "resident_adapter_bytes",
    "weight_file_bytes",
]
