"""The plugin module named by this package's ``moa`` entry point.

DoRA registers ``peft_type=None``: the PEFT type ``"LORA"`` belongs to the built-in LoRA
type. DoRA folders are claimed by content instead: :meth:`moa_dora.DoraConfig.accepts`
says yes to ``{"peft_type": "LORA", "use_dora": true}``, and moa's loader prefers a type
that accepts a config over the one registered for its ``peft_type``.
"""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import AdapterTypeSpec


@hookimpl
def moa_adapter_types() -> list[AdapterTypeSpec]:
    """Provide the ``"dora"`` adapter type.

    Returns:
        One :class:`AdapterTypeSpec`.
    """
    from moa_dora.dora import DoraConfig, DoraLayer  # imported on use: listing stays cheap

    return [
        AdapterTypeSpec(
            name="dora",
            config_class=DoraConfig,
            layer_class=DoraLayer,
            peft_type=None,
            description="DoRA: LoRA with a learned magnitude; reads PEFT LORA folders with use_dora.",
        )
    ]
