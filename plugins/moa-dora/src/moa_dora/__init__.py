"""moa-dora: DoRA for moa, as a LoRA variant (PEFT's ``peft_type`` ``"LORA"`` + ``use_dora``).

Example::

    import moa
    from moa_dora import DoraConfig

    model.add_adapter("sql", DoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    model.load_adapter("peft-dora-folder", adapter_name="code")   # use_dora: true -> DoRA
"""

from moa_dora.dora import DoraConfig, DoraLayer

__version__ = "0.1.0"

__all__ = ["DoraConfig", "DoraLayer", "__version__"]
