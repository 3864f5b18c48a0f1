"""moa-lycoris: the LoHa and LoKr adapter types for moa (``peft_type`` ``"LOHA"`` and ``"LOKR"``).

Example::

    import moa
    from moa_lycoris import LoHaConfig, LoKrConfig

    model.add_adapter("style", LoHaConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("math", LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model.load_adapter("path/to/peft-loha-folder", adapter_name="tone")
"""

from moa_lycoris.config import LycorisConfig
from moa_lycoris.layer import LycorisLayer
from moa_lycoris.loha import LoHaConfig, LoHaLayer
from moa_lycoris.lokr import LoKrConfig, LoKrLayer, factorization

__version__ = "0.1.0"

__all__ = [
    "LoHaConfig",
    "LoHaLayer",
    "LoKrConfig",
    "LoKrLayer",
    "LycorisConfig",
    "LycorisLayer",
    "__version__",
    "factorization",
]
