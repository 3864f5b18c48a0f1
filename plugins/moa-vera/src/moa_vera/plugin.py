"""The plugin module named by this package's ``moa`` entry point.

It uses only moa's public plugin API: ``moa.hookspecs.hookimpl`` and
``moa.plugin.records.AdapterTypeSpec``.
"""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import AdapterTypeSpec


@hookimpl
def moa_adapter_types() -> list[AdapterTypeSpec]:
    """Provide the ``"vera"`` adapter type, which reads and writes PEFT's ``"VERA"`` folders.

    Returns:
        One :class:`AdapterTypeSpec`.
    """
    from moa_vera.config import VeraConfig  # imported on use: listing plugins stays cheap
    from moa_vera.layer import VeraLayer

    return [
        AdapterTypeSpec(
            name="vera",
            config_class=VeraConfig,
            layer_class=VeraLayer,
            peft_type="VERA",
            description="VeRA: shared frozen random projections, trainable per-module vectors; PEFT-compatible.",
        )
    ]
