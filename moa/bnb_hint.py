"""Keep bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" off the console.

On CPUs with AVX512-BF16, importing bitsandbytes (>= 0.48) tries to fetch an optional CPU
kernel from the Hugging Face Hub (``kernels-community/quantization-bitsandbytes``, through
the ``kernels`` package) and logs a WARNING when that fails, which it always does offline.
moa does not need that kernel: NF4 runs on bitsandbytes' built-in CPU path, with the same
results. :func:`install_kernel_hint_filter` re-routes that one record to moa's log at DEBUG
and logs, once per process, an INFO line saying what it means.

The filter sits on bitsandbytes' logger object, which exists (and keeps the filter) before
bitsandbytes is imported, so it also catches the message when another library (PEFT,
transformers) is the first to import bitsandbytes. ``import moa`` installs it; it only
uses the standard library, so ``import moa`` stays cheap.

Example::

    from moa.bnb_hint import install_kernel_hint_filter
    install_kernel_hint_filter()   # idempotent; import bitsandbytes afterwards
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

#: The bitsandbytes logger that emits the hint (``bitsandbytes/backends/cpu/ops.py``).
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
#: Text that identifies the hint in the record's message.
HINT_MARKER = "kernels-community"
#: What moa logs (once per process, at INFO) when it catches the hint.
EXPLANATION = (
    "bitsandbytes' optional CPU kernel comes from the Hugging Face Hub (kernels-community), which is "
    "unreachable offline; moa uses bitsandbytes' built-in CPU path for NF4, results are the same"
)

_lock = threading.Lock()
_explained = False


class KernelHintFilter(logging.Filter):
    """Drop bitsandbytes' kernels-community hint from its logger; log it to moa's log instead.

    The record goes to ``moa.bnb_hint`` at DEBUG (with bitsandbytes' own text), and the
    first one in the process also logs :data:`EXPLANATION` at INFO.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Return ``False`` (drop) for the kernels-community hint, ``True`` for anything else."""
        if HINT_MARKER not in str(record.msg):
            return True
        global _explained
        with _lock:
            first, _explained = not _explained, True
        logger.debug("bitsandbytes (%s, was %s): %s", record.name, record.levelname, record.getMessage())
        if first:
            logger.info(EXPLANATION)
        return False


def install_kernel_hint_filter() -> KernelHintFilter:
    """Put :class:`KernelHintFilter` on bitsandbytes' CPU ops logger (once; later calls reuse it).

    Returns:
        The installed filter.
    """
    target = logging.getLogger(BNB_CPU_OPS_LOGGER)
    with _lock:
        for existing in target.filters:
            if isinstance(existing, KernelHintFilter):
                return existing
        hint_filter = KernelHintFilter()
        target.addFilter(hint_filter)
        return hint_filter


__all__ = ["BNB_CPU_OPS_LOGGER", "EXPLANATION", "KernelHintFilter", "install_kernel_hint_filter"]
