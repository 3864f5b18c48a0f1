"""Kernel tests: Triton runs interpreted on the CPU (``TRITON_INTERPRET=1``), for real on CUDA.

The interpreter flag must be set before any ``@triton.jit`` kernel is defined, i.e.
before ``moa.kernels.triton`` is first imported, so it is set here at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device() -> torch.device:
    """Where the kernel tests run: CUDA when present, else the CPU (Triton interpreted)."""
    return DEVICE
