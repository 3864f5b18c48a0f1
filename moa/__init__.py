"""moa: many domain LoRA adapters over one shared NF4 base, mixed per request.

The public API is listed in ``__all__``; heavy modules (torch models, transformers,
the plugin manager) are imported on first use, so ``import moa`` stays cheap.

Example::

    import moa
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    model.load_adapter("adapters/sql", adapter_name="sql")
    model.load_adapter("adapters/code", adapter_name="code")
    out = model(input_ids, adapter_names=["sql", "code", None])
"""

from __future__ import annotations

import importlib
from typing import Any

from moa.bnb_hint import install_kernel_hint_filter

__version__ = "0.1.0"

# bitsandbytes' offline "kernels-community" WARNING -> moa's log (DEBUG), whoever imports it first.
install_kernel_hint_filter()

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "MixtureModel": "moa.model.mixture_model",
    "MixtureLinear": "moa.model.mixture_linear",
    "AdapterConfig": "moa.adapters.base",
    "AdapterLayer": "moa.adapters.base",
    "LoraConfig": "moa.adapters.lora",
    "LoraLayer": "moa.adapters.lora",
    "RoutingDecision": "moa.routing.decision",
    "Router": "moa.routing.router",
    "RoutingRequest": "moa.routing.router",
    "FixedRouter": "moa.routing.fixed",
    "hookimpl": "moa.hookspecs",
    "AdapterTypeSpec": "moa.plugin.records",
    "RouterSpec": "moa.plugin.records",
    "MergeStrategySpec": "moa.plugin.records",
    "get_adapter_type": "moa.plugin",
    "get_router": "moa.plugin",
    "get_merge_strategy": "moa.plugin",
    "list_plugins": "moa.plugin",
    "default_base_path": "moa.model.base_loading",
    "load_base": "moa.model.base_loading",
    "MoaError": "moa.errors",
    "push_adapter": "moa.hub",
    "pull_adapter": "moa.hub",
    "push_mixture": "moa.hub",
    "pull_mixture": "moa.hub",
    "merge_adapters": "moa.merge",
    "export_mixture": "moa.merge",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
