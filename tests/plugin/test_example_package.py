"""The real, pip-installed example plugin package (plugins/moa-plugin-example)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moa.plugin import get_router, list_plugins
from moa.routing import Router, RoutingRequest

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = "pip install --no-deps --no-build-isolation plugins/moa-plugin-example"


@pytest.fixture
def example_installed() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("moa-plugin-example")
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"moa-plugin-example is not installed in CI; run `{INSTALL_HINT}` first.")
        pytest.skip(f"moa-plugin-example is not installed; run `{INSTALL_HINT}` to test it.")


def test_installed_example_plugin_is_discovered(example_installed):
    assert example_installed.version == "0.1.0"

    router_cls = get_router("round_robin")

    assert issubclass(router_cls, Router)
    info = {i.name: i for i in list_plugins()}["example"]
    assert (info.distribution, info.version, info.source, info.status) == (
        "moa-plugin-example", "0.1.0", "entry point", "loaded")
    assert dict(info.provides) == {"routers": ("round_robin",)}


def test_round_robin_routes_row_i_to_adapter_i_mod_n(example_installed):
    router = get_router("round_robin")()
    names = ["sql", "code", "math"]
    request = RoutingRequest(input_ids=torch.zeros(5, 4, dtype=torch.long), adapter_names=names)

    decision = router.route(request)

    assert decision.to_mixtures(names) == [
        {"sql": 1.0}, {"code": 1.0}, {"math": 1.0}, {"sql": 1.0}, {"code": 1.0}]
    assert decision.ids[:, 0].tolist() == [0, 1, 2, 0, 1]
    empty = router.route(RoutingRequest(input_ids=torch.zeros(2, 1, dtype=torch.long),
                                        adapter_names=[]))
    assert empty.to_mixtures([]) == [{}, {}]
    with pytest.raises(ValueError, match="start must be an int >= 0"):
        get_router("round_robin")(start=-1)


def test_fresh_process_finds_the_example_plugin(example_installed):
    code = textwrap.dedent("""
        import json
        from moa.plugin import get_router, list_plugins
        cls = get_router("round_robin")
        info = {i.name: i for i in list_plugins()}["example"]
        print(json.dumps([cls.__module__, cls.__name__, info.distribution, info.version]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("MOA_DISABLE_PLUGINS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [
        "moa_plugin_example.plugin", "RoundRobinRouter", "moa-plugin-example", "0.1.0"]
