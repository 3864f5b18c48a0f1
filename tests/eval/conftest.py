"""Fixtures of the eval tests."""

from __future__ import annotations

import pytest

from tests.train.helpers import one_thread

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
