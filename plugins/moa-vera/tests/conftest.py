"""moa-vera's tests: moa.testing's fixtures, with this package's plugin module under test.

The fixtures are imported rather than enabled with ``pytest_plugins = ["moa.testing.fixtures"]``
because pytest accepts ``pytest_plugins`` only in a top-level conftest, and this one is
nested when moa's repository runs every package's tests at once (``pytest plugins``).
In a standalone plugin repository either way works.
"""

from __future__ import annotations

from typing import Any

import pytest

from moa.testing.fixtures import *  # noqa: F403 - moa_tiny_model, moa_plugin_manager, ...


@pytest.fixture
def moa_plugin_modules() -> list[Any]:
    """The plugin module the ``moa_plugin_manager`` fixture registers (if not installed)."""
    import moa_vera.plugin

    return [moa_vera.plugin]


@pytest.fixture(params=["generic", "batched"])
def vera_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on each path VeRA layers can take: the generic one (default) and the batched one."""
    from moa_vera import VeraLayer

    monkeypatch.setattr(VeraLayer, "batched", request.param == "batched")
    return request.param
