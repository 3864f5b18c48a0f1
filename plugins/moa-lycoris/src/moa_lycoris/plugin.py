"""The plugin module named by this package's ``moa`` entry point.

It uses only moa's public plugin API: ``moa.hookspecs.hookimpl`` and
``moa.plugin.records.AdapterTypeSpec``.
"""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import AdapterTypeSpec


@hookimpl
def moa_adapter_types() -> list[AdapterTypeSpec]:
    """Provide ``"loha"`` and ``"lokr"``, which read and write PEFT's ``"LOHA"`` and ``"LOKR"`` folders.

    Returns:
        Two :class:`AdapterTypeSpec` records.
    """
    # imported on use: listing plugins stays cheap
    from moa_lycoris.loha import LoHaConfig, LoHaLayer
    from moa_lycoris.lokr import LoKrConfig, LoKrLayer

    return [
        AdapterTypeSpec(
            name="loha",
            config_class=LoHaConfig,
            layer_class=LoHaLayer,
            peft_type="LOHA",
            description="LoHa: low-rank Hadamard product weight change; PEFT-compatible.",
        ),
        AdapterTypeSpec(
            name="lokr",
            config_class=LoKrConfig,
            layer_class=LoKrLayer,
            peft_type="LOKR",
            description="LoKr: Kronecker product weight change; PEFT-compatible.",
        ),
    ]
