"""docs/writing-a-plugin.md documents every hook with its exact signature, and its runnable blocks run."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest

from moa import hookspecs
from moa.plugin import reset_plugin_manager

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-a-plugin.md"
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def hook_names() -> list[str]:
    """Every hook specification in moa.hookspecs (functions pluggy marked as specs)."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return sorted(name for name, obj in vars(hookspecs).items()
                  if inspect.isfunction(obj) and hasattr(obj, marker))


def signature_line(name: str) -> str:
    """``def moa_x(*, a: T) -> R`` as written in the source (string annotations kept)."""
    function = getattr(hookspecs, name)
    params = []
    for param in inspect.signature(function).parameters.values():
        text = param.name + (f": {param.annotation}" if param.annotation is not param.empty else "")
        params.append(text)
    if params:
        params.insert(0, "*")
    returns = function.__annotations__.get("return", "None")
    return f"def {name}({', '.join(params)}) -> {returns}"


def runnable_blocks() -> list[str]:
    return [m.group("body") for m in FENCE.finditer(DOC.read_text(encoding="utf-8"))
            if m.group("info").split()[:2] == ["python", "runnable"]]


def test_hooks_are_found():
    assert hook_names() == ["moa_adapter_types", "moa_input_adapter_types", "moa_merge_strategies", "moa_routers"]


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented_with_its_exact_signature_and_a_runnable_example(name):
    text = DOC.read_text(encoding="utf-8")
    assert f"### `{name}`" in text, f"{DOC.name} has no section for hook {name}"
    assert signature_line(name) in text, f"{DOC.name} lacks the signature `{signature_line(name)}`"
    assert any(f"def {name}(" in block for block in runnable_blocks()), (
        f"no runnable block of {DOC.name} implements {name}")


@pytest.mark.parametrize("index", range(len(runnable_blocks())))
def test_runnable_block_runs(index, monkeypatch):
    monkeypatch.delenv("MOA_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("MOA_STRICT_PLUGINS", raising=False)
    code = runnable_blocks()[index]
    module = types.ModuleType(f"doc_block_{index}")  # each block is a plugin module of its own
    module.__file__ = f"{DOC}#block{index}"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        exec(compile(code, module.__file__, "exec"), module.__dict__)
    finally:
        reset_plugin_manager()
