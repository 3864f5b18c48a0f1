"""Fixtures of the eval tests."""

from __future__ import annotations

import pytest

from tests.train.helpers import one_thread

single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture
def tiny_chat_model(tiny_base_dir):
    """A fresh fp32 MixtureModel over the tiny base, with the tiny tokenizer."""
    from tests.train.helpers import load_tiny

    return load_tiny(tiny_base_dir)
