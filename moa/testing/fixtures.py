"""Helpers and pytest fixtures for testing moa plugins on a tiny random model.

Use the fixtures from a plugin package's *top-level* test conftest (the folder pytest is
pointed at, or a ``testpaths`` entry; pytest refuses ``pytest_plugins`` in deeper ones)::

    # tests/conftest.py of your plugin package
    import pytest

    pytest_plugins = ["moa.testing.fixtures"]

    @pytest.fixture
    def moa_plugin_modules():
        import my_plugin.plugin
        return [my_plugin.plugin]        # registered by the moa_plugin_manager fixture

Nothing here downloads anything: the base is a random 4-layer Llama (vocab 258, hidden 64)
and the tokenizer a byte-level one built in memory, so tests run in seconds on a CPU.
The plain functions (``make_tiny_base``, ``make_tiny_model``...) work without pytest
fixtures too.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from moa.model.mixture_model import MixtureModel
    from moa.plugin.manager import MoaPluginManager

#: The tiny Llama config: big enough for GQA, 4 layers (hidden-state routers can pick 0..3).
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=258,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=257,
    eos_token_id=256,
    bos_token_id=256,
)


def make_tiny_base(seed: int = 0, **overrides: Any) -> Any:
    """A tiny random ``LlamaForCausalLM`` in float32 and eval mode.

    Args:
        seed: Seed for the random weights (same seed, same model).
        **overrides: :data:`TINY_CONFIG` entries to change.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides})).eval()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer matching :data:`TINY_CONFIG`: ids 0-255 are bytes.

    ``<eos>`` is 256 and ``<pad>`` 257; decoding gives the text back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def save_tiny_base(directory: str | os.PathLike, seed: int = 0, **overrides: Any) -> Path:
    """Save :func:`make_tiny_base` (safetensors) and the tiny tokenizer to ``directory``.

    Args:
        directory: The folder to write (created if missing).
        seed: Seed for the random weights.
        **overrides: :data:`TINY_CONFIG` entries to change (the tokenizer stays the same).

    Returns:
        The folder, loadable by ``transformers``, PEFT and ``moa.MixtureModel.from_pretrained``.
    """
    path = Path(directory)
    make_tiny_base(seed, **overrides).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def load_tiny_base(directory: str | os.PathLike) -> Any:
    """A fresh float32 eval-mode copy of the base saved by :func:`save_tiny_base`."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def make_tiny_model(base_dir: str | os.PathLike | None = None, seed: int = 0) -> MixtureModel:
    """A :class:`moa.MixtureModel` over a tiny base, with the tiny tokenizer, no adapters.

    Args:
        base_dir: A folder from :func:`save_tiny_base`; ``None`` builds the base in memory.
        seed: Seed of the in-memory base (ignored with ``base_dir``).
    """
    from moa.model.mixture_model import MixtureModel

    base = load_tiny_base(base_dir) if base_dir is not None else make_tiny_base(seed)
    return MixtureModel(base, tokenizer=make_tiny_tokenizer())


def random_input_ids(batch: int = 4, seq_len: int = 7, seed: int = 1) -> torch.Tensor:
    """``[batch, seq_len]`` random byte ids (valid for the tiny base)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, seq_len), generator=generator)


@contextlib.contextmanager
def fresh_plugin_manager(plugins: Sequence[ModuleType | Any] = ()) -> Iterator[MoaPluginManager]:
    """Rebuild moa's process-wide plugin manager, with ``plugins`` registered, for a block.

    Installed entry points are discovered as usual; each of ``plugins`` that they did not
    already load is registered in code. The manager is reset again on exit, so nothing
    leaks into other tests.

    Args:
        plugins: Plugin modules (or objects) under test.

    Yields:
        The fresh :class:`~moa.plugin.MoaPluginManager` (what ``moa.get_adapter_type`` uses).
    """
    from moa.plugin import get_plugin_manager, reset_plugin_manager

    reset_plugin_manager()
    try:
        manager = get_plugin_manager()
        for plugin in plugins:
            if not manager.pluggy_manager.is_registered(plugin):
                manager.register(plugin)
        yield manager
    finally:
        reset_plugin_manager()


def require_plugin(distribution: str, module: str) -> ModuleType:
    """Import a plugin package's module, or skip the test module when it is not installed.

    Under CI (``CI=1``/``true``) a missing package fails instead of skipping, so a broken
    install cannot pass silently.

    Args:
        distribution: The pip distribution name, e.g. ``"moa-ia3"``.
        module: The module to import, e.g. ``"moa_ia3"``.

    Returns:
        The imported module.
    """
    hint = f"pip install --no-deps --no-build-isolation ./plugins/{distribution}"
    try:
        importlib.metadata.distribution(distribution)
        return importlib.import_module(module)
    except (importlib.metadata.PackageNotFoundError, ImportError) as error:
        message = f"{distribution} is not installed ({error}); run `{hint}` to test it."
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)
        raise  # unreachable: skip raises


# --- pytest fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def moa_tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama base (and tokenizer) saved once per session."""
    return save_tiny_base(tmp_path_factory.mktemp("moa-tiny-base"))


@pytest.fixture
def moa_tiny_base(moa_tiny_base_dir: Path) -> Any:
    """A fresh copy of the tiny base as a plain transformers model (e.g. for PEFT)."""
    return load_tiny_base(moa_tiny_base_dir)


@pytest.fixture
def moa_tiny_model(moa_tiny_base_dir: Path) -> MixtureModel:
    """A fresh :class:`moa.MixtureModel` over the tiny base, with a tokenizer, no adapters."""
    return make_tiny_model(moa_tiny_base_dir)


@pytest.fixture
def moa_input_ids() -> torch.Tensor:
    """A ``[4, 7]`` batch of token ids for the tiny base."""
    return random_input_ids(4, 7)


@pytest.fixture
def moa_plugin_modules() -> list[Any]:
    """The plugin modules under test; override it in your conftest (default: none)."""
    return []


@pytest.fixture
def moa_plugin_manager(moa_plugin_modules: list[Any]) -> Iterator[MoaPluginManager]:
    """A fresh process-wide plugin manager with :func:`moa_plugin_modules` registered."""
    with fresh_plugin_manager(moa_plugin_modules) as manager:
        yield manager


__all__ = [
    "TINY_CONFIG",
    "fresh_plugin_manager",
    "load_tiny_base",
    "make_tiny_base",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "moa_input_ids",
    "moa_plugin_manager",
    "moa_plugin_modules",
    "moa_tiny_base",
    "moa_tiny_base_dir",
    "moa_tiny_model",
    "random_input_ids",
    "require_plugin",
    "save_tiny_base",
]
