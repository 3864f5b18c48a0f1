"""A full disk (ENOSPC) or a permission error during a save: a clear error, the old version intact.

The failures are simulated where they happen for real: in the write of the safetensors file,
in the flush to disk (``fsync``), in the rename, and in creating the temporary folder (a
read-only folder; as root ``chmod`` stops nothing, so then ``mkdir`` is made to refuse).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

import moa
from moa.atomic import WriteError, atomic_write_bytes
from moa.errors import MoaError
from tests.crash.harness import ROOT, leftovers, snapshot

pytestmark = pytest.mark.timeout(60)


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def no_permission(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def half_then_full(tensors, filename, metadata=None):
    """What safetensors does on a full disk: part of the file written, then ENOSPC."""
    with open(filename, "wb") as handle:
        handle.write(b"\0" * 1000)
    full_disk()


def add_lora(model, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    model.add_adapter(name, moa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))


@pytest.fixture
def saved_adapter(tiny_model, tmp_path):
    """A model with adapters ``a`` and ``b``; ``a`` saved at ``out/adapter`` (the old version)."""
    add_lora(tiny_model, "a", 1)
    add_lora(tiny_model, "b", 2)
    target = tmp_path / "out" / "adapter"
    tiny_model.save_adapter("a", target)
    return tiny_model, target, snapshot(target)


def check_clear_error(error: BaseException, code: int, words: str, target: Path) -> None:
    assert isinstance(error, WriteError) and isinstance(error, MoaError) and isinstance(error, OSError)
    assert error.errno == code
    message = str(error)
    assert words in message and str(target) in message and "previous version is intact" in message, message
    assert "retry" in message  # the next step


@pytest.mark.parametrize(("where", "patch"), [
    pytest.param("safetensors.torch.serialize_file", half_then_full, id="mid-write"),
    pytest.param("os.fsync", full_disk, id="flush"),
    pytest.param("moa.atomic.exchange_paths", full_disk, id="swap"),
])
def test_disk_full_during_an_adapter_save(saved_adapter, monkeypatch, where, patch):
    model, target, old = saved_adapter
    monkeypatch.setattr(where, patch)
    with pytest.raises(OSError) as raised:
        model.save_adapter("b", target)
    check_clear_error(raised.value, errno.ENOSPC, "disk is full", target)
    monkeypatch.undo()
    assert snapshot(target) == old and leftovers(target) == []
    model.save_adapter("b", target)  # space again: the save works
    assert snapshot(target) != old


def test_read_only_folder_refuses_an_adapter_save(saved_adapter, monkeypatch):
    model, target, old = saved_adapter
    if os.geteuid() == 0:  # root writes through chmod: make the folder refuse new entries instead
        monkeypatch.setattr("os.mkdir", no_permission)
    else:
        target.parent.chmod(0o555)
    try:
        with pytest.raises(OSError) as raised:
            model.save_adapter("b", target)
    finally:
        target.parent.chmod(0o755)
    check_clear_error(raised.value, errno.EACCES, "permission denied", target)
    monkeypatch.undo()
    assert snapshot(target) == old and leftovers(target) == []


def test_disk_full_during_a_router_save(tmp_path, monkeypatch):
    from moa.routing.learned_gate import LearnedGate

    target = tmp_path / "router"
    LearnedGate(["a", "b"], hidden_size=64).save(target)
    old = snapshot(target)
    monkeypatch.setattr("safetensors.torch.serialize_file", half_then_full)
    with pytest.raises(OSError) as raised:
        LearnedGate(["a", "b", "c"], hidden_size=64).save(target)
    check_clear_error(raised.value, errno.ENOSPC, "disk is full", target)
    assert snapshot(target) == old and leftovers(target) == []


@pytest.mark.parametrize(("where", "patch", "code"), [
    pytest.param("os.fsync", full_disk, errno.ENOSPC, id="disk-full"),
    pytest.param("moa.atomic.exchange_paths", full_disk, errno.ENOSPC, id="disk-full-at-swap"),
    pytest.param("os.open", no_permission, errno.EACCES, id="no-permission"),
])
def test_registry_sync_write_error_leaves_the_entries_intact(tmp_path, monkeypatch, where, patch, code):
    from moa.hub.registry import sync_shipped_entries

    root = tmp_path / "registry"
    shutil.copytree(ROOT / "registry", root)
    sql = root / "adapters" / "sql.toml"
    sql.write_text(sql.read_text() + "# stale\n")  # a sync rewrites it
    old = snapshot(root)
    monkeypatch.setattr(where, patch)
    with pytest.raises(OSError) as raised:
        sync_shipped_entries(root)
    monkeypatch.undo()
    check_clear_error(raised.value, code, "disk is full" if code == errno.ENOSPC else "permission denied", sql.parent)
    assert snapshot(root) == old and leftovers(sql) == []
    assert sync_shipped_entries(root) and sync_shipped_entries(root, write=False) == []


def test_atomic_write_keeps_the_old_file_when_the_disk_fills(tmp_path, monkeypatch):
    path = tmp_path / "entry.toml"
    path.write_bytes(b"old")
    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(WriteError, match="disk is full"):
        atomic_write_bytes(path, b"new" * 1000)
    assert path.read_bytes() == b"old" and leftovers(path) == []
