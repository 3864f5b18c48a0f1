"""Where the shipped demo adapters and gate live, and loading a folder of adapters."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from moa.errors import AdapterFormatError

logger = logging.getLogger(__name__)

ROUTER_DIRNAME = "router"


def shipped_adapters_dir() -> Path:
    """``moa/demo_adapters``: the five domain adapters and the gate shipped in the package."""
    return Path(__file__).resolve().parent.parent / "demo_adapters"


def adapter_folders(directory: str | os.PathLike) -> dict[str, Path]:
    """``{name: folder}`` for every sub-folder of ``directory`` holding ``adapter_config.json``.

    Names are the sub-folder names; the built-in domains come first, in their fixed order.
    """
    root = Path(directory)
    if not root.is_dir():
        raise AdapterFormatError(
            f"Adapter folder {str(root)!r} does not exist. Train adapters with 'moa train-adapter' "
            f"(or examples/train_demo_adapters.py), or omit --adapters to use the shipped ones."
        )
    found = {p.name: p for p in sorted(root.iterdir()) if (p / "adapter_config.json").is_file()}
    try:
        from moa.data import DOMAINS
    except ImportError:  # pragma: no cover
        DOMAINS = ()
    ordered = {d: found[d] for d in DOMAINS if d in found}
    ordered.update({k: v for k, v in found.items() if k not in ordered})
    if not ordered:
        raise AdapterFormatError(f"No adapter folders (with adapter_config.json) under {str(root)!r}.")
    return ordered


def load_adapters(model: Any, directory: str | os.PathLike, names: list[str] | None = None) -> list[str]:
    """Load every adapter folder under ``directory`` (or only ``names``) into ``model``."""
    folders = adapter_folders(directory)
    loaded = []
    for name, folder in folders.items():
        if names is not None and name not in names:
            continue
        if name not in model.adapter_names:
            model.load_adapter(folder, adapter_name=name)
        loaded.append(name)
    logger.info("Loaded adapters %s from %s.", loaded, directory)
    return loaded


def router_dir(adapters_dir: str | os.PathLike) -> Path:
    """The gate folder that goes with an adapters folder (``<adapters>/router``)."""
    return Path(adapters_dir) / ROUTER_DIRNAME
