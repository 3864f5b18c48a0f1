"""``moa registry sync-shipped`` is atomic for the whole set of entries, not per entry.

Every test starts from a copy of the checkout's registry whose shipped entries are all stale
(synced from an older manifest: another base fingerprint), one shipped entry the manifest no
longer lists, and entries the sync must not touch: a Hub entry (odd bytes, mode 0600), a text
file and the plugins. The sync is then killed (SIGKILL, in a subprocess, at a chosen file
system call), made to fail half-way, or watched at every file system call, and the tests check
that the registry holds exactly the old set or exactly the new set, byte for byte, and that no
temporary folder is left behind (or, after a SIGKILL, that readers ignore it and the next sync
removes it). See docs/reliability.md, "Registry sync: all entries or none".
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import moa
from moa.atomic import WriteError
from moa.hub.registry import load_registry, sync_shipped_entries
from tests.crash.harness import ROOT, leftovers, snapshot

pytestmark = pytest.mark.timeout(120)

MANIFEST = Path(moa.__file__).resolve().parent / "demo_adapters" / "manifest.json"
HUB_ENTRY = (  # CRLF, comments and trailing blanks: kept byte for byte
    '# a Hub entry, hand-written\r\nname = "hub"   \r\nrepo = "alice/sql"\r\nrevision = "' + "a" * 40 + '"\r\n'
    'adapter_type = "lora"\r\ndomains = ["sql"]\r\nlicense = "apache-2.0"\r\n\r\n[base]\r\nmodel_id = "m"\r\n'
    'fingerprint = "' + "0" * 24 + '"\r\n[files]\r\n"adapter_config.json" = "' + "0" * 64 + '"\r\n'
    '"adapter_model.safetensors" = "' + "1" * 64 + '"\r\n'
)
RETIRED = (  # a shipped entry the manifest no longer lists: the sync removes it
    'name = "retired"\nsource = "moa/demo_adapters/retired"\nadapter_type = "lora"\ndomains = ["sql"]\n'
    'license = "apache-2.0"\n[base]\nmodel_id = "m"\nfingerprint = "' + "0" * 24 + '"\n[files]\n'
    '"adapter_config.json" = "' + "0" * 64 + '"\n"adapter_model.safetensors" = "' + "1" * 64 + '"\n'
)
NOT_SHIPPED = ("adapters/README.md", "adapters/hub.toml", "adapters/notes.txt")

# Runs one sync in a fresh interpreter and SIGKILLs it at ``kill_at``: "entry-N" just before the
# N-th entry file is flushed to disk (N-1 entries complete), "after-swap" right after the folder swap.
CHILD = r"""
import os, signal, sys
import moa.atomic
from moa.hub.registry import sync_shipped_entries

root, manifest, kill_at, log = sys.argv[1:5]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kill_at.startswith("entry-"):
    real_fsync, flushed = os.fsync, []
    def fsync(fd):
        number = fd if isinstance(fd, int) else fd.fileno()
        name = os.path.basename(os.readlink(f"/proc/self/fd/{number}"))
        if ".toml" in name and os.path.isfile(f"/proc/self/fd/{number}"):
            flushed.append(name)
            if len(flushed) == int(kill_at.split("-")[1]):
                die()
            with open(log, "a") as handle:
                handle.write(name + "\n")
        return real_fsync(fd)
    os.fsync = fsync
elif kill_at == "after-swap":
    real_exchange = moa.atomic.exchange_paths
    def exchange(first, second):
        real_exchange(first, second)
        die()
    moa.atomic.exchange_paths = exchange
sync_shipped_entries(root, manifest=manifest)
"""


def old_manifest(folder: Path) -> Path:
    """The same demo adapters as an older manifest described them: every shipped entry differs."""
    data = json.loads(MANIFEST.read_text())
    data["base_fingerprint"] = "0" * len(data["base_fingerprint"])
    path = folder / "old-manifest.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def registry(tmp_path: Path) -> tuple[Path, dict[str, bytes], dict[str, bytes]]:
    """A registry in its old state, and snapshots of the old and the new state (name -> bytes)."""
    root = tmp_path / "registry"
    shutil.copytree(ROOT / "registry", root)
    sync_shipped_entries(root, manifest=old_manifest(tmp_path))
    adapters = root / "adapters"
    (adapters / "hub.toml").write_bytes(HUB_ENTRY.encode())
    (adapters / "hub.toml").chmod(0o600)
    os.utime(adapters / "hub.toml", (1_000_000_000, 1_000_000_000))
    (adapters / "notes.txt").write_bytes(b"not an entry\n\x00\xff")
    (adapters / "retired.toml").write_text(RETIRED)
    reference = tmp_path / "reference"
    shutil.copytree(root, reference)
    sync_shipped_entries(reference)
    old, new = snapshot(root), snapshot(reference)
    changed = {name for name in set(old) | set(new) if old.get(name) != new.get(name)}
    assert len(changed) == 6 and "adapters/retired.toml" in changed  # 5 stale entries, 1 removed
    assert all(old[name] == new[name] for name in NOT_SHIPPED)
    return root, old, new


def needs_proc() -> None:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file is flushed")


def entry_fsync_hook(monkeypatch: pytest.MonkeyPatch, on_entry: int, action: Callable[[], None]) -> list[str]:
    """Make ``os.fsync`` call ``action()`` just before it flushes the ``on_entry``-th entry file."""
    real_fsync, flushed = os.fsync, []

    def fsync(fd: int) -> None:
        path = f"/proc/self/fd/{fd}"
        if ".toml" in os.path.basename(os.readlink(path)) and os.path.isfile(path):
            flushed.append(os.path.basename(os.readlink(path)))
            if len(flushed) == on_entry:
                action()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return flushed


@pytest.mark.parametrize("kill_at", ["entry-2", "entry-5", "after-swap"])
def test_killed_sync_leaves_the_old_or_the_new_set_and_the_next_sync_cleans_up(registry, tmp_path, kill_at):
    needs_proc()
    root, old, new = registry
    log = tmp_path / "flushed.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", CHILD, str(root), str(MANIFEST), kill_at, str(log)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert child.returncode == -signal.SIGKILL, f"the sync was not killed at {kill_at}: {child.stderr[-2000:]}"
    if kill_at.startswith("entry-"):  # it had written (and flushed) entries before it died
        assert len(log.read_text().split()) == int(kill_at.split("-")[1]) - 1

    state = snapshot(root)
    assert state in (old, new), f"killed at {kill_at}: a mix of old and new entries " + str(
        sorted(name for name in set(state) | set(old) if state.get(name) != old.get(name)))
    if kill_at.startswith("entry-"):
        assert state == old
    assert leftovers(root / "adapters"), "the killed sync left no temporary folder: the test missed its moment"
    registry_now = load_registry(root)  # readers ignore the hidden leftover
    assert sorted(registry_now.adapters) == sorted(Path(name).stem for name in state
                                                   if name.startswith("adapters/") and name.endswith(".toml"))

    sync_shipped_entries(root)  # the next sync completes (or only cleans up) with no help
    assert snapshot(root) == new and leftovers(root / "adapters") == []
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in (ROOT / "registry").iterdir())


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), RuntimeError("injected")],
                         ids=["disk-full", "any-exception"])
def test_exception_half_way_leaves_the_old_set_and_no_temporary_folder(registry, monkeypatch, error):
    needs_proc()
    root, old, new = registry

    def fail() -> None:
        raise error

    flushed = entry_fsync_hook(monkeypatch, 3, fail)
    with pytest.raises(type(error)) as raised:
        sync_shipped_entries(root)
    assert len(flushed) == 3  # it failed on the third entry, two were written before
    if isinstance(error, OSError):
        assert isinstance(raised.value, WriteError) and raised.value.errno == errno.ENOSPC
        assert "previous version is intact" in str(raised.value)
    monkeypatch.undo()
    assert snapshot(root) == old
    assert leftovers(root / "adapters") == [] and not [p for p in (root / "adapters").iterdir() if p.name[0] == "."]
    sync_shipped_entries(root)
    assert snapshot(root) == new and leftovers(root / "adapters") == []


def test_non_shipped_entries_are_kept_byte_for_byte_during_and_after_a_sync(registry, monkeypatch):
    """A reader looking at any file system call of the sync sees the non-shipped entries unchanged
    and the shipped ones all old or all new; afterwards they keep their bytes, mode and times."""
    root, old, new = registry
    hub = root / "adapters" / "hub.toml"
    before = hub.stat()
    seen: list[dict[str, bytes]] = []
    real_fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        seen.append(snapshot(root))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    assert "adapters/retired.toml: not in the manifest" in sync_shipped_entries(root)
    monkeypatch.undo()
    seen.append(snapshot(root))
    assert len(seen) > 6
    for moment, state in enumerate(seen):
        assert all(state.get(name) == old[name] for name in NOT_SHIPPED), f"moment {moment}: non-shipped changed"
        assert state in (old, new), f"moment {moment}: a reader saw old and new entries mixed"
    assert seen[-1] == new
    after = hub.stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    assert load_registry(root).adapters["hub"].repo == "alice/sql"


def test_sync_killed_between_two_renames_restores_the_old_folder_first(registry, tmp_path):
    """Without renameat2 a swap is two renames; killed between them, ``adapters/`` is only the hidden
    ``.adapters.old-<pid>-*``. The next sync puts it back before reading, so no entry is lost."""
    root, old, new = registry
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    os.replace(root / "adapters", root / f".adapters.old-{dead}-0123abcd")
    sync_shipped_entries(root)
    assert snapshot(root) == new and leftovers(root / "adapters") == []
