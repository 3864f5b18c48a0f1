"""moa-ia3: the IA3 adapter type for moa (``peft_type`` ``"IA3"``).

Example::

    import moa
    from moa_ia3 import IA3Config

    model.add_adapter("style", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"]))
"""

from moa_ia3.ia3 import IA3Config, IA3Layer

__version__ = "0.1.0"

__all__ = ["IA3Config", "IA3Layer", "__version__"]
