"""Freeing a thread's idle OpenMP workers: they exit, and torch still computes after."""

from __future__ import annotations

import os
import time

import pytest
import torch

from moa.serve.openmp import release_idle_openmp_threads


def threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_the_idle_pool_exits_and_comes_back_on_demand():
    if torch.get_num_threads() < 2:
        pytest.skip("one OpenMP thread: there is no worker pool to free")
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    expected = (a.double() @ a.double()).float()
    torch.testing.assert_close(a @ a, expected, rtol=1e-4, atol=1e-3)  # the pool now exists
    before = threads_now()
    if not release_idle_openmp_threads():
        pytest.skip("no GNU OpenMP runtime in this process")
    deadline = time.monotonic() + 5
    while threads_now() >= before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads_now() < before  # its workers exited
    torch.testing.assert_close(a @ a, expected, rtol=1e-4, atol=1e-3)  # and come back when needed
