"""Pure-torch kernels: the executable specification and the CPU production path.

Never imports triton. ``moa/kernels/triton`` mirrors these file and function names.
"""

from moa.kernels.reference.lora_expand import lora_expand
from moa.kernels.reference.lora_shrink import lora_shrink

__all__ = ["lora_expand", "lora_shrink"]
