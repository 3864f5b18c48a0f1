"""Every object the API reference renders (``::: moa.x`` in docs/api/) has a docstring, and so has each public member.

mkdocstrings leaves an undocumented member out of the page without a word
(``show_if_no_docstring: false``), so a missing docstring would silently drop it from the
API reference: this test is what makes that an error.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

API = Path(__file__).resolve().parents[2] / "docs" / "api"
DIRECTIVE = re.compile(r"^:::\s+(moa(?:\.\w+)+)\s*$", re.MULTILINE)


def rendered_paths() -> list[str]:
    return sorted({m.group(1) for page in API.glob("*.md") for m in DIRECTIVE.finditer(page.read_text(encoding="utf-8"))})


def resolve(path: str):
    """Import ``moa.a.b.Name`` (the longest importable module prefix, then attributes)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(path)


def public_members(obj) -> list[tuple[str, object]]:
    """Public functions, methods and classes defined by ``obj`` itself (a module or a class)."""
    members = []
    for name, member in vars(obj).items():
        if name.startswith("_"):
            continue
        function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if not (inspect.isfunction(function) or inspect.isclass(function)):
            continue
        if inspect.ismodule(obj) and getattr(function, "__module__", None) != obj.__name__:
            continue  # imported into the module, documented where it is defined
        if inspect.isclass(obj) and getattr(function, "__qualname__", "").split(".")[0] != obj.__name__:
            continue  # an alias or inherited helper bound in the class body
        members.append((name, function))
    return members


def test_the_api_pages_render_something():
    assert len(rendered_paths()) > 20


@pytest.mark.parametrize("path", rendered_paths())
def test_rendered_object_and_its_public_members_have_docstrings(path):
    obj = resolve(path)
    assert inspect.getdoc(obj), f"{path} has no docstring"
    undocumented = [name for name, member in public_members(obj) if not (member.__doc__ or "").strip()]
    assert undocumented == [], f"{path}: public members without a docstring: {undocumented}"
