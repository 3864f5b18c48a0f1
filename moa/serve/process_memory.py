"""How much memory this process holds, as the kernel accounts it (Linux ``/proc``).

Resident set size counts every shared page in full in every process that maps it, so it
overstates a process that shares libraries or a page cache with others. The proportional
set size (PSS) divides each shared page among the processes that map it: summed over
processes it is the machine's real use. ``moa serve`` exports it in ``/metrics`` and
``benchmarks/base_memory.py`` reports it.
"""

from __future__ import annotations

import math
from pathlib import Path

_KIB = 1024


def proportional_set_size_bytes(pid: int | str = "self") -> float:
    """The PSS of process ``pid`` in bytes, from ``/proc/<pid>/smaps_rollup``.

    Args:
        pid: A process id, or ``"self"``.

    Returns:
        Bytes, or ``nan`` where the system does not report it (not Linux, or the process is gone).
    """
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="ascii")
    except OSError:
        return math.nan
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return float(int(line.split()[1]) * _KIB)
    return math.nan


__all__ = ["proportional_set_size_bytes"]
