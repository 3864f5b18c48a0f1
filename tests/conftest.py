"""Shared fixtures: tiny random Llama bases (fast) and seeds."""

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
import torch  # noqa: E402

TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def make_tiny_llama(seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM (fp32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides}))
    return model.eval()


def make_tiny_tokenizer():
    """A 256-token tokenizer for the tiny base: one token per byte-ish character class.

    Token ids stay below the tiny vocab size; words split on whitespace, unknown words map
    to ``<unk>``. Enough to exercise text routing, chat prompts and generation.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in (chr(c) for c in range(33, 127)):
        vocab.setdefault(ch, len(vocab))
    words = "the a of to and in is it you that what sql code math french medical write compute".split()
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(pattern="", behavior="isolated")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny random Llama saved as a local base folder (safetensors + tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(tiny_base_dir):
    """A fresh fp32 MixtureModel over the tiny base, no adapters."""
    from transformers import LlamaForCausalLM

    import moa

    base = LlamaForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    return moa.MixtureModel(base)


@pytest.fixture
def input_ids():
    """A [4, 7] batch of token ids for the tiny base."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY_CONFIG["vocab_size"], (4, 7), generator=generator)
