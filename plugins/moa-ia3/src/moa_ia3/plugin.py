"""The plugin module named by this package's ``moa`` entry point.

It uses only moa's public plugin API: ``moa.hookspecs.hookimpl`` and
``moa.plugin.records.AdapterTypeSpec``.
"""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import AdapterTypeSpec


@hookimpl
def moa_adapter_types() -> list[AdapterTypeSpec]:
    """Provide the ``"ia3"`` adapter type, which reads and writes PEFT's ``"IA3"`` folders.

    Returns:
        One :class:`AdapterTypeSpec`.
    """
    from moa_ia3.ia3 import IA3Config, IA3Layer  # imported on use: listing plugins stays cheap

    return [
        AdapterTypeSpec(
            name="ia3",
            config_class=IA3Config,
            layer_class=IA3Layer,
            peft_type="IA3",
            description="(IA)^3: learned vectors scaling k, v and the FFN input; PEFT-compatible.",
        )
    ]
