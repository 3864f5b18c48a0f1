"""Structure rules: no import cycles between moa's packages, no reaching into private names.

Read from the source with :mod:`ast` (nothing is imported), so a new cycle or a new
``obj._private`` access fails here before it hides behind a lazy import.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOA = ROOT / "moa"

#: Modules that belong to a package other than the one their path says.
GROUPS = {"moa.hookspecs": "moa.plugin"}  # the hook specs are the plugin system's contract

#: Import edges allowed against the package order, each for a stated reason.
ALLOWED_BACK_EDGES = {
    # PEFT-style convenience methods on the model, thin delegations (issue 11 keeps them)
    ("moa.model.mixture_model", "load_adapter", "moa.hub"),
    ("moa.model.mixture_model", "save_pretrained", "moa.hub"),
    ("moa.model.mixture_model", "load_pretrained_adapters", "moa.hub"),
    ("moa.model.mixture_model", "push_to_hub", "moa.hub"),
    ("moa.model.mixture_model", "push_adapter", "moa.hub"),
    ("moa.model.mixture_model", "merge_and_unload", "moa.merge"),
    ("moa.model.mixture_model", "merge_into_base", "moa.merge"),
    # the registry loads the built-in plugins the way it loads a third party's entry points
    ("moa.plugin.manager", "_load_builtins", "moa.default_plugins"),
    ("moa.plugin.manager", "_load_entry_points", "moa.default_plugins"),
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def package_of(module: str) -> str:
    module = next((group for prefix, group in GROUPS.items() if module.startswith(prefix)), module)
    return ".".join(module.split(".")[:2])


class _Imports(ast.NodeVisitor):
    """Every ``moa`` import of one module, with the function it sits in (not TYPE_CHECKING)."""

    def __init__(self) -> None:
        self.found: list[tuple[str, str]] = []  # (imported module, enclosing function or "")
        self._functions: list[str] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._functions.append(node.name)
        self.generic_visit(node)
        self._functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" not in ast.unparse(node.test):
            self.generic_visit(node)

    def _add(self, target: str) -> None:
        if target == "moa" or target.startswith("moa."):
            self.found.append((target, self._functions[0] if self._functions else ""))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            names = [f"moa.{a.name}" for a in node.names] if node.module == "moa" else [node.module]
            for name in names:
                self._add(name)


def package_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> ["module:function", ...] (allowed back edges left out)."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(MOA.rglob("*.py")):
        module = module_name(path)
        source = package_of(module)
        if source == "moa":  # the facade (moa/__init__.py) re-exports everything lazily
            continue
        visitor = _Imports()
        visitor.visit(ast.parse(path.read_text()))
        for target, function in visitor.found:
            dest = package_of(target)
            if dest in ("moa", source) or (module, function, dest) in ALLOWED_BACK_EDGES:
                continue
            graph[source][dest].append(f"{module}:{function or '<module>'}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of packages, if any (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_moa_packages():
    graph = package_graph()
    cycle = find_cycle(graph)
    if cycle:
        where = {f"{a} -> {b}": graph[a][b][:3] for a, b in zip(cycle, cycle[1:])}
        raise AssertionError(f"Import cycle between moa packages: {' -> '.join(cycle)}; edges: {where}")


def test_the_cycle_check_catches_a_cycle():
    graph = {"moa.a": {"moa.b": ["x"]}, "moa.b": {"moa.c": ["y"]}, "moa.c": {"moa.a": ["z"]}}
    assert find_cycle(graph) == ["moa.a", "moa.b", "moa.c", "moa.a"]
    assert find_cycle({"moa.a": {"moa.b": ["x"]}}) is None


def moa_private_names() -> set[str]:
    """Single-underscore names moa defines: functions, methods, classes, attributes."""
    names: set[str] = set()
    for path in MOA.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_accesses(paths: list[Path], private: set[str]) -> list[str]:
    """``obj._name`` uses of moa's private names on anything but ``self``/``cls``."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in private:
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                found.append(f"{shown}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_access_to_another_objects_private_names():
    private = moa_private_names()
    paths = sorted(MOA.rglob("*.py")) + sorted((ROOT / "plugins").glob("*/src/**/*.py"))
    found = private_accesses(paths, private)
    assert not found, "Use the owner's public API instead of:\n" + "\n".join(found)


def test_the_private_access_check_catches_one(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(model):\n    return model._router\n\nclass A:\n    def g(self):\n        return self._x\n")
    found = [line.split(": ", 1)[1] for line in private_accesses([bad], {"_router", "_x"})]
    assert found == ["model._router"]
