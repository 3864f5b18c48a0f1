"""moa-adalora's tests: moa.testing's fixtures, with this package's plugin module under test.

The fixtures are imported rather than enabled with ``pytest_plugins = ["moa.testing.fixtures"]``
because pytest accepts ``pytest_plugins`` only in a top-level conftest, and this one is
nested when moa's repository runs every package's tests at once (``pytest plugins``).
In a standalone plugin repository either way works.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moa.testing.fixtures import *  # noqa: F403 - moa_tiny_model, moa_plugin_manager, ...


@pytest.fixture
def moa_plugin_modules() -> list[Any]:
    """The plugin module the ``moa_plugin_manager`` fixture registers (if not installed)."""
    import moa_adalora.plugin

    return [moa_adalora.plugin]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """torch on one thread: the tiny model gains nothing from more, and a shared CPU stalls on them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
