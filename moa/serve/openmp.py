"""Hand the CPU's OpenMP threads to the engine thread.

torch's CPU kernels run on OpenMP (GNU ``libgomp`` in the PyPI wheels). Every Python
thread that runs a parallel torch op gets its own OpenMP worker pool, and the pool outlives
the op. When the process holds more OpenMP threads than there are CPUs, libgomp stops
letting idle workers spin for the next parallel region and puts them to sleep at once,
and every one of the thousands of small parallel regions of a decode step then pays a
futex wake-up. The model is loaded on the main thread (its pool stays) and then decoded on
the engine's thread (a second pool): on our 2-core machine that made one decode step of
16 rows cost 257-311 ms instead of 149-169 ms (``benchmarks/serve_load.py``'s model, same
process, same rows).

:func:`release_idle_openmp_threads` frees the calling thread's idle pool (OpenMP 5.0
``omp_pause_resource_all``, soft pause): its workers exit, and the runtime starts new ones
if that thread runs parallel work again, so it is always safe to call. The engine calls it
on the thread that starts it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

#: ``omp_pause_soft`` in ``omp.h``: free the threads, keep nothing else.
OMP_PAUSE_SOFT = 1


@functools.lru_cache(maxsize=1)
def _libgomp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime this process already loaded (torch's own copy), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing to do
        return None
    paths = sorted({line.split()[-1] for line in maps.splitlines() if "libgomp" in line.split()[-1]})
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # the already-loaded library: dlopen returns the same handle
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all"):
            return lib
    return None


def release_idle_openmp_threads() -> bool:
    """Free the calling thread's idle OpenMP worker threads (see the module docstring).

    Returns:
        Whether a GNU OpenMP runtime was found and released them. Other runtimes (Intel's
        ``libiomp5``) and platforms without ``/proc`` are left alone.
    """
    lib = _libgomp()
    if lib is None:
        return False
    released = lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
    logger.debug("Released this thread's idle OpenMP workers: %s", released)
    return released
