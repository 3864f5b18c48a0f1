"""The pre-quantized NF4 cache: same model as quantizing in memory, never a dense weight, all-or-nothing writes."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moa.model import base_loading, nf4_cache
from moa.model.base_loading import load_base
from moa.testing.fixtures import TINY_CONFIG, random_input_ids, save_tiny_base

pytest.importorskip("bitsandbytes")

HIDDEN, INTERMEDIATE = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]
HEAD_DIM = HIDDEN // TINY_CONFIG["num_attention_heads"]
KV = TINY_CONFIG["num_key_value_heads"] * HEAD_DIM
#: The [out, in] shapes of the tiny base's quantized layers (q/o, k/v, gate/up, down).
QUANTIZED_SHAPES = {(HIDDEN, HIDDEN), (KV, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(nf4_cache.ENV_SWITCH, raising=False)
    return tmp_path / "home"


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return save_tiny_base(tmp_path / "tiny-base")


def copies(home: Path) -> list[Path]:
    root = home / nf4_cache.CACHE_DIRNAME
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


class DenseWeightSpy(TorchDispatchMode):
    """Records every real (not meta) floating tensor shaped like a quantized layer's weight that an op reads or makes.

    transformers builds the skeleton on the meta device (no memory), so meta tensors do not count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*torch.utils._pytree.tree_leaves((args, kwargs or {})), *torch.utils._pytree.tree_leaves(out)]
        for value in flat:
            if (isinstance(value, torch.Tensor) and value.device.type != "meta" and value.is_floating_point()
                    and tuple(value.shape) in QUANTIZED_SHAPES):
                self.seen.append((str(func), tuple(value.shape)))
        return out


def test_cached_copy_equals_quantizing_in_memory(home, tiny_dir, monkeypatch):
    tokens = random_input_ids()
    monkeypatch.setenv(nf4_cache.ENV_SWITCH, "0")
    in_memory, _ = load_base(tiny_dir, quantization="nf4", compute_dtype=torch.float32)
    assert copies(home) == []
    monkeypatch.delenv(nf4_cache.ENV_SWITCH)
    first, _ = load_base(tiny_dir, quantization="nf4", compute_dtype=torch.float32)  # writes the copy
    [copy] = copies(home)
    marker = json.loads((copy / nf4_cache.MARKER_FILENAME).read_text())
    assert marker["source"] == str(tiny_dir.resolve())

    def must_not_quantize(*args, **kwargs):
        raise AssertionError("a current copy exists: the base must not be quantized again")

    monkeypatch.setattr(base_loading, "_quantize_on_load", must_not_quantize)
    second, _ = load_base(tiny_dir, quantization="nf4", compute_dtype=torch.float32)
    assert torch.equal(logits(first, tokens), logits(in_memory, tokens))
    assert torch.equal(logits(second, tokens), logits(in_memory, tokens))
    assert base_loading.base_fingerprint(second) == base_loading.base_fingerprint(in_memory)
    assert second.name_or_path == in_memory.name_or_path == str(tiny_dir)  # the base, not the cache folder


def test_loading_the_copy_never_materializes_a_dense_weight_of_a_quantized_layer(home, tiny_dir):
    load_base(tiny_dir, quantization="nf4")  # writes the copy
    with DenseWeightSpy() as uncached_spy:
        os.environ[nf4_cache.ENV_SWITCH] = "0"
        try:
            load_base(tiny_dir, quantization="nf4")
        finally:
            del os.environ[nf4_cache.ENV_SWITCH]
    assert uncached_spy.seen, "the spy must see the dense weights that quantizing in memory reads"
    with DenseWeightSpy() as spy:
        model, _ = load_base(tiny_dir, quantization="nf4")
    assert spy.seen == []
    assert sum(base_loading.is_quantized_linear(m) for m in model.modules()) == 7 * TINY_CONFIG["num_hidden_layers"]


def test_a_changed_base_gets_a_new_copy_and_the_old_one_is_deleted(home, tiny_dir):
    load_base(tiny_dir, quantization="nf4")
    [old] = copies(home)
    weights = tiny_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_base(tiny_dir, quantization="nf4")
    [new] = copies(home)
    assert new != old


def test_copies_of_deleted_bases_are_pruned(home, tmp_path):
    gone = save_tiny_base(tmp_path / "gone")
    load_base(gone, quantization="nf4")
    for path in sorted(gone.iterdir()):
        path.unlink()
    gone.rmdir()
    kept = save_tiny_base(tmp_path / "kept")
    load_base(kept, quantization="nf4")
    [copy] = copies(home)
    assert json.loads((copy / nf4_cache.MARKER_FILENAME).read_text())["source"] == str(kept.resolve())


def test_a_failed_write_leaves_no_copy_and_the_load_still_succeeds(home, tiny_dir, monkeypatch, caplog):
    from transformers import PreTrainedModel

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with caplog.at_level(logging.WARNING, logger="moa.model.nf4_cache"):
        model, _ = load_base(tiny_dir, quantization="nf4", compute_dtype=torch.float32)
    assert copies(home) == []
    assert not any((home / nf4_cache.CACHE_DIRNAME).glob("*tmp*"))
    assert "Could not cache the NF4 copy" in caplog.text and "MOA_NF4_CACHE=0" in caplog.text
    monkeypatch.undo()
    monkeypatch.setenv("MOA_HOME", str(home))
    reference, _ = load_base(tiny_dir, quantization="nf4", compute_dtype=torch.float32)
    tokens = random_input_ids()
    assert torch.equal(logits(model, tokens), logits(reference, tokens))


def test_an_unwritable_home_falls_back_to_quantizing_in_memory(tmp_path, tiny_dir, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where MOA_HOME should be")
    monkeypatch.setenv("MOA_HOME", str(blocker))
    with caplog.at_level(logging.WARNING, logger="moa.model.nf4_cache"):
        model, _ = load_base(tiny_dir, quantization="nf4")
    assert "Could not cache the NF4 copy" in caplog.text
    assert blocker.read_text() == "a file where MOA_HOME should be"
    assert any(base_loading.is_quantized_linear(m) for m in model.modules())


def test_the_switch_turns_the_cache_off(home, tiny_dir, monkeypatch):
    monkeypatch.setenv(nf4_cache.ENV_SWITCH, "off")
    load_base(tiny_dir, quantization="nf4")
    assert copies(home) == []
