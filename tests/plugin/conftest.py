"""Fixtures for the plugin-registry tests: real (on-disk) fake distributions, clean env."""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from moa.plugin import MoaPluginManager, MoaPluginWarning, reset_plugin_manager

_counter = itertools.count()

#: A plugin module body providing one router; format with name=<router name>.
ROUTER_PLUGIN = '''
from moa.hookspecs import hookimpl
from moa.plugin.records import RouterSpec
from moa.routing import FixedRouter


class {cls}(FixedRouter):
    name = "{name}"


@hookimpl
def moa_routers():
    return [RouterSpec(name="{name}", router_class={cls}, description="test router")]
'''


def router_plugin(name: str) -> str:
    """Source of a plugin module that provides the router ``name``."""
    cls = "".join(part.title() for part in name.split("_")) + "Router"
    return ROUTER_PLUGIN.format(name=name, cls=cls)


@pytest.fixture(autouse=True)
def _clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No MOA_* plugin settings leak in from the shell; no global manager leaks between tests."""
    monkeypatch.delenv("MOA_STRICT_PLUGINS", raising=False)
    monkeypatch.delenv("MOA_DISABLE_PLUGINS", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Path]]:
    """Write a real installed-looking distribution (``*.dist-info``) plus its modules.

    Call ``make_dist(name, version, entry_points={ep_name: "module"}, modules={"module": src})``.
    Each call uses a fresh folder prepended to ``sys.path`` (so entry points of later calls
    come first), and importlib caches are invalidated. Modules are removed from
    ``sys.modules`` afterwards.
    """
    created: list[str] = []

    def make(name: str, version: str, entry_points: dict[str, str],
             modules: dict[str, str] | None = None) -> Path:
        root = tmp_path / f"site{next(_counter)}"
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
        lines = ["[moa]"] + [f"{ep} = {target}" for ep, target in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for module, source in (modules or {}).items():
            path = root / (module.replace(".", "/") + ".py")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(source), encoding="utf-8")
            created.append(module)
        monkeypatch.syspath_prepend(str(root))
        importlib.invalidate_caches()
        return root

    yield make
    for module in created:
        sys.modules.pop(module, None)
    importlib.invalidate_caches()


@pytest.fixture
def fresh_manager() -> Callable[..., MoaPluginManager]:
    """Build a manager over the fake distributions only (no built-ins unless asked)."""

    def build(**kwargs: object) -> MoaPluginManager:
        kwargs.setdefault("load_builtins", False)
        return MoaPluginManager(**kwargs)  # type: ignore[arg-type]

    return build


class WarningLog:
    """The warnings raised during a test, every one kept (no de-duplication)."""

    def __init__(self, record: list[warnings.WarningMessage]) -> None:
        self.record = record

    def plugin(self, needle: str = "") -> list[str]:
        """Messages of the :class:`MoaPluginWarning` s that mention ``needle``."""
        return [str(w.message) for w in self.record
                if issubclass(w.category, MoaPluginWarning) and needle in str(w.message)]


@pytest.fixture
def warning_log() -> Iterator[WarningLog]:
    """Record every warning raised inside the test."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield WarningLog(record)


@pytest.fixture
def router_source() -> Callable[[str], str]:
    """``router_source(name)``: source of a plugin module that provides router ``name``."""
    return router_plugin
