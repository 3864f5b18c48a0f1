"""The process memory ``moa serve`` reports in /metrics: PSS from /proc, and Prometheus' process_* series."""

from __future__ import annotations

import math
import mmap
import sys

import pytest

from moa.serve.metrics import ServeMetrics
from moa.serve.process_memory import proportional_set_size_bytes

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PSS comes from Linux /proc")


@linux
def test_pss_counts_memory_this_process_touches():
    size = 64 * 2**20
    block = mmap.mmap(-1, size)  # fresh anonymous pages: an allocator could hand back memory already counted
    before = proportional_set_size_bytes()
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1  # touch every page
    after = proportional_set_size_bytes()
    block.close()
    assert before > 0 and after - before > 48 * 2**20


def test_pss_of_a_missing_process_is_nan():
    assert math.isnan(proportional_set_size_bytes(2**31 - 1))


@linux
def test_metrics_expose_pss_and_resident_memory():
    text = ServeMetrics().render().decode()
    pss = [line for line in text.splitlines() if line.startswith("moa_process_pss_bytes ")]
    assert len(pss) == 1
    reported, now = float(pss[0].split()[1]), proportional_set_size_bytes()
    assert abs(reported - now) < 0.2 * now  # read at scrape time
    assert any(line.startswith("process_resident_memory_bytes ") for line in text.splitlines())
