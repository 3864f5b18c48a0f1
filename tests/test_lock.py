"""The locked environment: what the set-up installs is the lock, and the locks agree with pyproject.

* The running environment holds nothing outside the lock it was installed from (``MOA_LOCK``,
  which ``make test`` sets): every installed distribution is pinned there at that version,
  except moa and the plugin packages under ``plugins/``, which the Makefile installs from this
  tree with ``--no-deps``.
* The Makefile and ``.ci/run`` install only from the locks (``--require-hashes``) or this tree
  (``--no-deps``).
* ``requirements/lock.txt`` satisfies every range in pyproject (moa's and the plugin
  packages'), and ``requirements/oldest.txt`` pins every direct dependency at exactly its
  floor, so that ``make test-oldest`` tests the floors pyproject declares.
"""

from __future__ import annotations

import os
import re
import shlex
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins(path: Path) -> dict[str, Version]:
    """``{canonical name: version}`` of a lock file's ``name==version`` lines."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match:
            found[canonicalize_name(match.group(1))] = Version(match.group(2))
    return found


def local_projects() -> set[str]:
    """moa and the plugin packages under plugins/: installed from this tree, not from a lock."""
    names = {"moa"}
    for pyproject in (ROOT / "plugins").glob("*/pyproject.toml"):
        names.add(canonicalize_name(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["name"]))
    return names


def declared_requirements() -> list[Requirement]:
    """The dependencies (and every extra's) of moa and of the plugin packages, for this Python."""
    texts = []
    for pyproject in [ROOT / "pyproject.toml", *sorted((ROOT / "plugins").glob("*/pyproject.toml"))]:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        texts += project.get("dependencies", [])
        texts += [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    requirements = [Requirement(text) for text in texts]
    return [r for r in requirements if r.marker is None or r.marker.evaluate()]


def installed_distributions() -> list[metadata.Distribution]:
    """Distributions installed in this environment's site-packages.

    Not the copies a package vendors on ``sys.path`` (setuptools puts ``setuptools/_vendor``
    there when it is imported): those are part of the package the lock pins.
    """
    roots = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    return [d for d in metadata.distributions() if Path(str(d.locate_file(""))).resolve() in roots]


def outside_lock(installed: dict[str, str], locked: dict[str, Version], local: set[str]) -> list[str]:
    """Installed distributions that the lock does not pin at their installed version."""
    wrong = []
    for name, version in sorted(installed.items()):
        if name in local:
            continue
        if name not in locked:
            wrong.append(f"{name}=={version} (not in the lock)")
        elif Version(version) != locked[name]:
            wrong.append(f"{name}=={version} (the lock pins {locked[name]})")
    return wrong


@pytest.mark.skipif(not os.environ.get("MOA_LOCK"), reason="run by `make test`, which sets MOA_LOCK to the lock it installed")
def test_the_environment_holds_exactly_what_the_lock_pins():
    locked = pins(ROOT / os.environ["MOA_LOCK"])
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in installed_distributions()}
    assert outside_lock(installed, locked, local_projects()) == []
    missing = sorted(set(locked) - set(installed))
    assert missing == [], f"pinned in the lock but not installed: {missing}"


def test_outside_lock_catches_an_unlocked_or_different_package():
    locked = {"torch": Version("2.13.0+cpu"), "peft": Version("0.22.0")}
    installed = {"torch": "2.13.0+cpu", "peft": "0.21.0", "requests": "2.0", "moa": "0.1.0"}
    assert outside_lock(installed, locked, {"moa"}) == ["peft==0.21.0 (the lock pins 0.22.0)",
                                                        "requests==2.0 (not in the lock)"]


def install_commands(path: Path) -> list[list[str]]:
    """The arguments after ``pip install`` on each line of a Makefile or shell script."""
    commands = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.search(r"(\bpip3?|\$\(PIP\))\s+install\b", line) and not line.lstrip().startswith("#"):
            words = shlex.split(line.replace("$$", "$"), comments=True)
            words = words[words.index("install") + 1:]
            ends = [i for i, word in enumerate(words) if word in ("||", "&&", ";") or word.endswith(";")]
            commands.append(words[:ends[0]] if ends else words)
    return commands


def test_the_makefile_and_ci_install_only_from_the_locks_or_this_tree():
    commands = install_commands(ROOT / "Makefile") + install_commands(ROOT / ".ci" / "run")
    assert commands, "no pip install found in the Makefile: the set-up moved; update this test"
    for words in commands:
        from_lock = "--require-hashes" in words and "-r" in words and "--no-deps" in words
        local = "--no-deps" in words and "-e" in words and "-r" not in words
        targets = [w for w in words if not w.startswith("-")]
        assert from_lock or local, f"installs outside the lock: pip install {' '.join(words)}"
        if local:
            assert all(t == "." or t.startswith("./") for t in targets), words
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.MULTILINE), ".ci/run must run the README's test command"
    assert re.search(r"MOA_LOCK=\S+ \$\(PY\) -m pytest", (ROOT / "Makefile").read_text(encoding="utf-8"))


@pytest.mark.parametrize("lock", ["lock.txt", "oldest.txt"])
def test_the_lock_satisfies_every_range_in_pyproject(lock):
    locked = pins(ROOT / "requirements" / lock)
    unmet = [f"{r} (locked: {locked.get(canonicalize_name(r.name))})" for r in declared_requirements()
             if canonicalize_name(r.name) not in locked
             or not r.specifier.contains(locked[canonicalize_name(r.name)], prereleases=True)]
    assert unmet == [], "pyproject changed since `make lock`: run it again"


def test_the_oldest_lock_pins_every_floor_exactly():
    locked = pins(ROOT / "requirements" / "oldest.txt")
    off = []
    for requirement in declared_requirements():
        floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
        version = locked.get(canonicalize_name(requirement.name))
        if floors and (version is None or Version(version.public) != max(floors)):
            off.append(f"{requirement}: oldest.txt has {version}")
    assert off == [], "a floor the resolver cannot reach is not a floor: raise it in pyproject"
