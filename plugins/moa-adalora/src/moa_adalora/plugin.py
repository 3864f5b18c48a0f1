"""The plugin module named by this package's ``moa`` entry point.

It uses only moa's public plugin API: ``moa.hookspecs.hookimpl`` and
``moa.plugin.records.AdapterTypeSpec``.
"""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import AdapterTypeSpec


@hookimpl
def moa_adapter_types() -> list[AdapterTypeSpec]:
    """Provide the ``"adalora"`` adapter type, which reads and writes PEFT's ``"ADALORA"`` folders.

    Returns:
        One :class:`AdapterTypeSpec`.
    """
    from moa_adalora.config import AdaLoraConfig  # imported on use: listing plugins stays cheap
    from moa_adalora.layer import AdaLoraLayer

    return [
        AdapterTypeSpec(
            name="adalora",
            config_class=AdaLoraConfig,
            layer_class=AdaLoraLayer,
            peft_type="ADALORA",
            description="AdaLoRA: SVD-form low-rank updates, ranks pruned while training; PEFT-compatible.",
        )
    ]
