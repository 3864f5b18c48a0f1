"""moa-vera: the VeRA adapter type for moa (``peft_type`` ``"VERA"``).

Example::

    import moa
    from moa_vera import VeraConfig

    model.add_adapter("style", VeraConfig(r=256, target_modules=["q_proj", "v_proj"]))
    model.load_adapter("path/to/peft-vera-folder", adapter_name="tone")
"""

from moa_vera.config import VeraConfig
from moa_vera.layer import VeraLayer
from moa_vera.projection import VeraProjection, generate_projection

__version__ = "0.1.0"

__all__ = ["VeraConfig", "VeraLayer", "VeraProjection", "__version__", "generate_projection"]
