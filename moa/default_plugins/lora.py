"""Built-in plugin: the LoRA adapter type (``peft_type`` ``"LORA"``)."""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import AdapterTypeSpec


@hookimpl
def moa_adapter_types() -> list[AdapterTypeSpec]:
    """Provide the ``"lora"`` adapter type.

    The adapter module is imported here, not at module level, so that listing plugins
    stays cheap and an import problem in it is reported against this plugin.

    Returns:
        One :class:`AdapterTypeSpec` for LoRA.
    """
    from moa.adapters.lora import LoraConfig, LoraLayer

    return [
        AdapterTypeSpec(
            name="lora",
            config_class=LoraConfig,
            layer_class=LoraLayer,
            peft_type="LORA",
            description="Low-rank adaptation (LoRA); PEFT-compatible; batched mixture kernels.",
        )
    ]
