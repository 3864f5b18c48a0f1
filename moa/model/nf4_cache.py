"""Pre-quantized NF4 copies of base models, kept in ``MOA_HOME`` and loaded as they are.

Quantizing a base at load time reads every dense weight first: transformers maps the
whole float checkpoint, and those pages stay resident for as long as the model's
unquantized tensors (embeddings, norms) share the mapping. For the default base that is
about 540 MiB held to keep 160 MiB of model. So the first NF4 load of a base quantizes it
once and saves the result with bitsandbytes' own 4-bit serialization (``save_pretrained``
of a ``Linear4bit`` model: packed weights plus quant states, the format transformers and
PEFT load); every later load reads that folder, in which no quantized layer has a dense
weight, and never touches the float checkpoint.

A copy is keyed by the source folder, its weight files' sizes and modification times, the
compute dtype and the bitsandbytes/transformers versions, so an edited or upgraded base
gets a fresh copy. When a copy is written, the older copies of the same base and every
copy whose source folder no longer exists are deleted. Writing is atomic (a half-written
copy is never used); if the cache cannot be written (read-only ``MOA_HOME``, full disk) the
model is quantized in memory as before and a warning says why. ``MOA_NF4_CACHE=0`` turns
the cache off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moa.atomic import atomic_directory
from moa.model.default_base import moa_home

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

CACHE_DIRNAME = "nf4"
MARKER_FILENAME = "moa_nf4_cache.json"
ENV_SWITCH = "MOA_NF4_CACHE"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def cache_enabled() -> bool:
    """Whether NF4 copies are cached (``MOA_NF4_CACHE`` unset, or anything but ``0``/``false``/``no``/``off``)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_root() -> Path:
    """The folder holding every cached NF4 copy: ``$MOA_HOME/nf4``."""
    return moa_home() / CACHE_DIRNAME


def source_key(source: str | os.PathLike[str], dtype: torch.dtype) -> dict[str, Any]:
    """What identifies a cached copy: the source folder, its weight files and the versions that wrote it.

    Args:
        source: A local base folder (a Hub id is resolved to its snapshot folder first).
        dtype: The compute dtype the copy is saved with.

    Returns:
        A JSON-serialisable dict; equal dicts mean the cached copy is current.
    """
    import bitsandbytes
    import transformers

    folder = Path(source).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return {
        "source": str(folder),
        "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        "dtype": str(dtype).removeprefix("torch."),
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
    }


def cache_dir_for(key: dict[str, Any]) -> Path:
    """The folder of the copy described by ``key`` (whether or not it exists yet)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f"{Path(key['source']).name}-{digest}"


def is_current(folder: Path, key: dict[str, Any]) -> bool:
    """Whether ``folder`` is a finished copy written for exactly ``key``."""
    try:
        return json.loads((folder / MARKER_FILENAME).read_text(encoding="utf-8")) == key
    except (OSError, ValueError):
        return False


def local_source(path: str) -> str | None:
    """The local folder behind ``path`` (itself, or a Hub id's snapshot in the HF cache), else ``None``."""
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached locally: no NF4 copy either
        return None


def load_cached_nf4(
    path: str,
    dtype: torch.dtype,
    quantize: Callable[[], PreTrainedModel],
    load: Callable[[str], PreTrainedModel],
) -> PreTrainedModel:
    """Load the NF4 copy of ``path`` from the cache, writing it first if needed.

    Args:
        path: The base: a local folder or a Hub id in the local HF cache.
        dtype: Compute dtype (part of the key).
        quantize: Quantizes the base in memory (the uncached way); used to write the copy,
            and as the fallback when caching is off or fails.
        load: Loads a pre-quantized folder as it is.

    Returns:
        The NF4 model.
    """
    source = local_source(path) if cache_enabled() else None
    if source is None:
        return quantize()
    key = source_key(source, dtype)
    folder = cache_dir_for(key)
    if not is_current(folder, key):
        try:
            _write_copy(folder, key, quantize)
        except Exception as error:  # noqa: BLE001 - a cache that cannot be written must not stop the load
            logger.warning(
                "Could not cache the NF4 copy of %s in %s (%s: %s); quantizing it in memory instead, which holds the "
                "dense checkpoint while loading. Free space or make MOA_HOME writable, or set %s=0 to stop trying.",
                path, folder, type(error).__name__, error, ENV_SWITCH,
            )
            return quantize()
    logger.info("Loading the pre-quantized NF4 copy of %s from %s.", path, folder)
    return load(str(folder))


def _write_copy(folder: Path, key: dict[str, Any], quantize: Callable[[], PreTrainedModel]) -> None:
    """Quantize once, save with bitsandbytes' serialization, mark complete; all or nothing."""
    _prune(key["source"])
    model = quantize()
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        (tmp / MARKER_FILENAME).write_text(json.dumps(key, indent=2, sort_keys=True), encoding="utf-8")
    del model  # releases the dense checkpoint's mapping before the copy is loaded


def _prune(replaced_source: str) -> None:
    """Delete the older copies of ``replaced_source`` and every copy whose source folder is gone."""
    root = cache_root()
    if not root.is_dir():
        return
    for folder in root.iterdir():
        try:
            source = json.loads((folder / MARKER_FILENAME).read_text(encoding="utf-8"))["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours, or being written: leave it
        if source == replaced_source or not Path(source).is_dir():
            shutil.rmtree(folder, ignore_errors=True)


__all__ = ["cache_dir_for", "cache_enabled", "cache_root", "is_current", "load_cached_nf4", "source_key"]
