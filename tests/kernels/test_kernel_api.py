"""The two kernel trees expose the same API, and the backend dispatch picks and refuses as documented."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from moa import kernels  # noqa: E402
from moa.errors import BackendUnavailableError  # noqa: E402
from moa.kernels import reference as ref  # noqa: E402
from moa.kernels import triton as tri  # noqa: E402


def _public_functions(module) -> dict[str, inspect.Signature]:
    """Signatures of the public functions a module defines itself (helpers are ``_private``)."""
    return {
        name: inspect.signature(obj)
        for name, obj in vars(module).items()
        if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == module.__name__
    }


def test_trees_have_the_same_files():
    def files(package):
        return sorted(p.name for p in Path(package.__file__).parent.glob("*.py"))

    assert files(ref) == files(tri)


def test_trees_expose_same_names_and_signatures():
    assert sorted(ref.__all__) == sorted(tri.__all__) == ["lora_expand", "lora_shrink"]
    assert {n: inspect.signature(getattr(ref, n)) for n in ref.__all__} == {
        n: inspect.signature(getattr(tri, n)) for n in tri.__all__
    }
    for name in ref.__all__:
        # per-file twins too (same module names), and the same Semantics contract
        ref_mod = importlib.import_module(f"moa.kernels.reference.{name}")
        tri_mod = importlib.import_module(f"moa.kernels.triton.{name}")
        assert _public_functions(ref_mod) == _public_functions(tri_mod) != {}
        ref_doc, tri_doc = getattr(ref_mod, name).__doc__, getattr(tri_mod, name).__doc__
        assert ref_doc.split("Semantics::")[1] == tri_doc.split("Semantics::")[1]


def test_dispatch_torch_triton_auto(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "torch")
    assert kernels.backend_for(cpu) is ref
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "triton")
    assert kernels.backend_for(cpu) is tri
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "auto")
    assert kernels.backend_for(cpu) is ref  # auto = triton on CUDA only
    monkeypatch.delenv("MOA_KERNEL_BACKEND")
    assert kernels.requested_backend() == "auto"
    if torch.cuda.is_available():
        assert kernels.backend_for(torch.device("cuda")) is tri


def test_unknown_backend_lists_the_choices(monkeypatch):
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "bogus")
    with pytest.raises(BackendUnavailableError, match="bogus") as info:
        kernels.backend_for(torch.device("cpu"))
    assert "auto, torch, triton" in str(info.value)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("MOA_KERNEL_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1") as info:
        kernels.backend_for(torch.device("cpu"))
    assert "torch, triton" in str(info.value)  # the available backends are named


def test_importing_triton_backend_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail, as if absent
    for name in [m for m in sys.modules if m == "moa.kernels.triton" or m.startswith("moa.kernels.triton.")]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test
    with pytest.raises(BackendUnavailableError, match="MOA_KERNEL_BACKEND=torch"):
        importlib.import_module("moa.kernels.triton")
    assert kernels.available_backends() == ["torch"]
