"""moa-adalora: the AdaLoRA adapter type for moa (``peft_type`` ``"ADALORA"``).

Example::

    import moa
    from moa_adalora import AdaLoraConfig

    model.add_adapter("sql", AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=12, target_r=4,
                                           tinit=10, tfinal=20, total_step=100))
    moa.train.train_adapter(model, "sql", examples, moa.train.SFTConfig(steps=100))  # ranks pruned as PEFT does
    model.load_adapter("peft-adalora-folder", adapter_name="code")                   # peft_type "ADALORA"
"""

from moa_adalora.config import AdaLoraConfig
from moa_adalora.layer import AdaLoraLayer

__version__ = "0.1.0"

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "__version__"]
