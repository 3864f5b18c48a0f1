"""What ``moa serve`` and its Ray replicas share when they set a server up: the adapters to
serve, the router and its check, the served base's name.

A library module (the command line and :mod:`moa.serve.ray_options` both import it), so the
Ray backend never depends on the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moa.errors import AdapterFormatError


def parse_lora_modules(pairs: list[str]) -> dict[str, str]:
    """``["sql=path", "code=alice/code@v1"]`` -> ``{"sql": "path", "code": "alice/code@v1"}``.

    Raises:
        AdapterFormatError: an entry without ``=``, or a name given twice.
    """
    modules: dict[str, str] = {}
    for pair in pairs:
        name, sep, source = pair.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise AdapterFormatError(
                f"--lora-modules entry {pair!r} must look like NAME=SOURCE, e.g. sql=./adapters/sql, "
                f"code=alice/code-lora@v1 or icd=icd (a registry name)."
            )
        if name in modules:
            raise AdapterFormatError(f"--lora-modules names {name!r} twice ({modules[name]!r} and {source!r}).")
        modules[name] = source
    return modules


def default_modules() -> tuple[dict[str, str], Path]:
    """The shipped demo adapters ``{name: folder}`` and the shipped gate's folder."""
    from moa.eval.assets import adapter_folders, router_dir, shipped_adapters_dir

    shipped = shipped_adapters_dir()
    return {name: str(folder) for name, folder in adapter_folders(shipped).items()}, router_dir(shipped)


def served_name(served_model_name: str | None, base: str) -> str:
    """The base's name in the API: ``served_model_name``, else a readable name of ``base``."""
    if served_model_name:
        return str(served_model_name)
    if base == "default":
        from moa.model.default_base import DEFAULT_BASE_ID

        return DEFAULT_BASE_ID.split("/")[-1]
    return Path(str(base).rstrip("/")).name if Path(base).is_dir() else str(base)


def load_router(router_folder: Path | None, modules: dict[str, str], hint: str) -> tuple[Any, list[str]]:
    """The router in ``router_folder`` (``None``: no router) and the adapters it routes to.

    Args:
        router_folder: Its folder, or ``None``.
        modules: The adapters served, ``{name: source}``.
        hint: How to add adapters or drop the router, for the error.

    Raises:
        AdapterFormatError: the router routes to adapters that are not served.
    """
    if router_folder is None:
        return None, []
    from moa.hub.pull import load_router_folder

    router = load_router_folder(router_folder)
    routed = list(getattr(router, "gate_adapters", None) or [])
    missing = [n for n in routed if n not in modules]
    if missing:
        raise AdapterFormatError(
            f"The router routes to {missing}, which are not among the adapters served ({sorted(modules)}). {hint}"
        )
    return router, routed
