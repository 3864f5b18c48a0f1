"""Fixtures of the training tests (the eval and routing tests import the helpers too)."""

from __future__ import annotations

import pytest

from tests.train.helpers import load_tiny, one_thread


@pytest.fixture
def tiny_chat_model(tiny_base_dir):
    """A fresh fp32 MixtureModel over the tiny base, with the tiny tokenizer."""
    return load_tiny(tiny_base_dir)


single_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
