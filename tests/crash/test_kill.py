"""Crash safety: SIGKILL a save at seeded random moments; the target is always a complete version.

A fork server (:mod:`tests.crash.worker`) runs each save in a forked worker that writes slowly
(safetensors in chunks, a pause before every fsync, mkdir, rename and delete, each logged as a
stage). For every operation the test measures one slowed run, then kills runs at moments drawn
(seeded, stratified) across it, and checks after each kill that

* the target is byte-for-byte the old complete version or the new complete version;
* nothing visible was added beside it (temporary copies are hidden ``.<name>.*`` names);
* the next run, with no help, completes, and no temporary copy remains;

and that the kills landed at several different stages.
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.crash.harness import ROOT, ForkServer, leftovers, snapshot

logger = logging.getLogger(__name__)

SEED = 14
KILLS = 5
SLOW = 0.03  # seconds of pause per traced file system call in a killed run
REGISTRY = ROOT / "registry"

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    fork_server = ForkServer(tmp_path_factory.mktemp("crash-worker"))
    try:
        yield fork_server
    finally:
        fork_server.close()


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def kill_during(server: Any, op: str, target: Path, delay: float, tries: int = 4) -> Any:
    """Write ``old`` into ``target``, then start writing ``new`` and SIGKILL it ``delay`` s in.

    The delay comes from one measured run; on a loaded machine a later run can be faster
    and end first. That is no kill, so it is retried at half the delay (a test of the
    guarantee, not of the machine's timing).
    """
    for _ in range(tries):
        server.run(op, target, "old")
        outcome = server.run_and_kill(op, target, "new", SLOW, delay)
        if outcome.signal == signal.SIGKILL:
            return outcome
        delay /= 2
    raise AssertionError(f"{op}: the write ended before every kill (last delay {delay:.2f} s)")


def kill_moments(op: str, duration: float, kills: int = KILLS) -> list[float]:
    """``kills`` seeded moments, one drawn in each equal slice of ``duration``."""
    rng = random.Random(f"{SEED}-{op}")
    return [duration * (i + rng.uniform(0.05, 0.95)) / kills for i in range(kills)]


@pytest.mark.parametrize("op", ["adapter", "router", "merged"])
def test_killed_folder_save_leaves_the_old_or_the_new_version(server, tmp_path, op):
    target = tmp_path / "out" / "saved"
    old_ref, new_ref = tmp_path / "ref-old" / "saved", tmp_path / "ref-new" / "saved"
    server.run(op, old_ref, "old")
    server.run(op, new_ref, "new")
    old, new = snapshot(old_ref), snapshot(new_ref)
    assert old and new and old != new
    measured = server.run(op, tmp_path / "timing" / "saved", "new", slow=SLOW)
    assert snapshot(tmp_path / "timing" / "saved") == new  # the slowed writer writes the same bytes

    landed = []
    for delay in kill_moments(op, measured.duration):
        outcome = kill_during(server, op, target, delay)
        landed.append(outcome.last_stage)
        state = snapshot(target)
        assert state in (old, new), f"killed at {outcome.last_stage!r}: the target is neither version"
        assert visible(target.parent) == ["saved"]
        server.run(op, target, "new")  # the next run recovers by itself
        assert snapshot(target) == new and leftovers(target) == [], leftovers(target)
    logger.info("%s: kills landed at %s", op, landed)
    assert len(set(landed)) >= 3, f"the kills landed at too few stages: {landed}"
    assert any(stage.startswith("write ") for stage in landed), f"no kill landed mid-write: {landed}"


def test_save_killed_just_before_the_new_folder_goes_in_leaves_the_old_one(server, tmp_path):
    """The riskiest moment: the new folder is complete and the old one must give way to it."""
    target, new_ref = tmp_path / "out" / "saved", tmp_path / "ref" / "saved"
    server.run("adapter", new_ref, "new")
    server.run("adapter", target, "old")
    old = snapshot(target)
    # "swap": the one-step exchange; "rename saved": the second of two renames (where no exchange exists)
    outcome = server.run_and_kill("adapter", target, "new", 0.2, 0.1, wait_for=("swap", "rename saved"))
    assert outcome.signal == signal.SIGKILL
    assert snapshot(target) in (old, snapshot(new_ref)), f"killed at {outcome.last_stage!r}: no complete version"
    server.run("adapter", target, "new")
    assert snapshot(target) == snapshot(new_ref) and leftovers(target) == []


def test_a_save_killed_between_two_renames_is_repaired_by_the_next_save(tmp_path):
    """Where folders cannot be swapped in one step, a kill between the two renames leaves only the
    moved-aside old folder; the next save (any writer of that target) puts it back first."""
    import subprocess
    import sys

    from moa.atomic import atomic_directory, clean_stale

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    target = tmp_path / "saved"
    aside = tmp_path / f".saved.old-{dead}-0123abcd"
    aside.mkdir()
    (aside / "a.json").write_text("old")
    (tmp_path / f".saved.tmp-{dead}-4567cdef").mkdir()  # the new folder it was renaming in
    assert clean_stale(target) == [tmp_path / f".saved.tmp-{dead}-4567cdef"]
    assert snapshot(target) == {"a.json": b"old"} and leftovers(target) == []
    with atomic_directory(target) as tmp:
        (tmp / "a.json").write_text("new")
    assert snapshot(target) == {"a.json": b"new"} and leftovers(target) == []


def test_killed_registry_sync_leaves_each_entry_old_or_new(server, tmp_path):
    roots = [tmp_path / name for name in ("registry", "ref-old", "ref-new", "timing")]
    for folder in roots:  # a copy of the checkout's registry (schema, plugins, Hub and shipped entries)
        shutil.copytree(REGISTRY, folder)
    root, old_root, new_root, timing = roots
    server.run("registry", old_root, "old")
    server.run("registry", new_root, "new")
    old, new = snapshot(old_root / "adapters"), snapshot(new_root / "adapters")
    assert set(old) == set(new) and sum(old[name] != new[name] for name in old) >= 3
    server.run("registry", timing, "old")
    measured = server.run("registry", timing, "new", slow=SLOW)

    landed, mixed = [], 0
    for delay in kill_moments("registry", measured.duration):
        outcome = kill_during(server, "registry", root, delay)
        landed.append(outcome.last_stage)
        state = snapshot(root / "adapters")
        assert set(state) == set(new), f"killed at {outcome.last_stage!r}: entries appeared or vanished"
        for name, data in state.items():
            assert data in (old[name], new[name]), f"killed at {outcome.last_stage!r}: {name} is torn"
        mixed += state not in (old, new)
        assert visible(root / "adapters") == sorted(new)
        server.run("registry", root, "new")  # the next sync completes it
        assert snapshot(root / "adapters") == new
        assert [p.name for p in (root / "adapters").iterdir() if p.name.startswith(".")] == []
    logger.info("registry sync: kills landed at %s (%d of %d left old and new entries mixed)", landed, mixed,
                len(landed))
    assert len(set(landed)) >= 2, f"the kills landed at too few stages: {landed}"


def test_killed_default_base_conversion_leaves_no_base_and_the_next_run_cleans_up(server, tmp_path):
    """The real GGUF conversion takes over a minute here: kill it early, at several points, and check
    that each next run removes what the killed one left before it starts converting."""
    pytest.importorskip("gguf")
    from moa.model.default_base import is_complete_base_dir

    home = tmp_path / "home"
    target = home / "bases" / "smollm2-135m-instruct"
    rng = random.Random(f"{SEED}-base")
    moments = [rng.uniform(0.0, 0.02), rng.uniform(0.5, 2.0), rng.uniform(3.0, 6.0)]
    landed, earlier = [], []
    for delay in [*moments, None]:
        if delay is None:  # one more run, killed as soon as it starts converting
            outcome = server.run_and_kill("base", home, "new", 0.01, 0.0, wait_for="mkdir .smollm2")
        else:
            outcome = server.run_and_kill("base", home, "new", 0.01, delay)
        assert outcome.signal == signal.SIGKILL, "the conversion ended before the kill"
        landed.append(outcome.last_stage)
        if any(stage.startswith("mkdir .smollm2") for stage in outcome.stages):
            assert not set(earlier) & set(leftovers(target)), f"a next run kept {earlier}"  # cleaned first
        assert not target.exists() and not is_complete_base_dir(target)  # old version: no base
        assert [n for n in visible(target.parent) if not n.endswith(".lock")] == []
        earlier = leftovers(target)
    logger.info("default base conversion: kills landed at %s", landed)
    assert len(set(landed)) >= 2, f"the kills landed at too few stages: {landed}"
