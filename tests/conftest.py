"""Shared fixtures: the tiny random Llama base of moa.testing.fixtures (fast), a clean test env."""

from __future__ import annotations

import os

# huggingface_hub reads these at import time: set them before anything imports it.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (torch itself never imports triton)

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported: set it before any
# test module (or a library such as bitsandbytes) can import triton. Without CUDA, the
# Triton kernels can only run interpreted on the CPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _free_local_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Every Hub call made by the tests goes to 127.0.0.1 on a port free now, never to a real Hub;
# tests/hub/conftest.py serves the Hub test server (tests/hub/server.py) there.
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_free_local_port()}"

import pytest  # noqa: E402

from moa.testing.fixtures import make_tiny_model, random_input_ids, save_tiny_base  # noqa: E402

# The one tiny base of every test is moa.testing.fixtures' (a random 4-layer Llama, hidden 64,
# byte-level tokenizer: vocab 258, <eos> 256, <pad> 257); build variants with its
# make_tiny_base(seed, **overrides) / save_tiny_base(path, seed, **overrides).


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """The tiny random Llama saved as a local base folder (safetensors + tokenizer), once."""
    return save_tiny_base(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_model(tiny_base_dir):
    """A fresh fp32 MixtureModel over the tiny base, with its tokenizer, no adapters."""
    return make_tiny_model(tiny_base_dir)


@pytest.fixture
def input_ids():
    """A [4, 7] batch of token ids for the tiny base."""
    return random_input_ids(4, 7)
