"""Helpers of the fuzz suites: example budgets, JSON and byte mutations, and the properties checked.

The property of every fuzz test: the input loads and works, or it raises a
:class:`moa.errors.MoaError` subclass whose message names the file and the field; never another
exception type, never a hang, and the model and the folder are exactly as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hypothesis import settings
from hypothesis import strategies as st

from moa.errors import MoaError

#: ``MOA_FUZZ_EXAMPLES=N``: run N random examples per fuzz test (local); unset: CI's fixed budgets.
FUZZ_EXAMPLES_ENV = "MOA_FUZZ_EXAMPLES"


def fuzz_settings(ci_examples: int) -> settings:
    """Hypothesis settings of one fuzz test: ``ci_examples`` derandomized in CI, else the env's budget."""
    local = os.environ.get(FUZZ_EXAMPLES_ENV, "").strip()
    if local:
        return settings(settings.get_profile("moa-local"), max_examples=int(local))
    return settings(settings.get_profile("moa-ci"), max_examples=ci_examples)


# --- values and mutations ----------------------------------------------------------------

#: Values a hostile or corrupt JSON file may hold where a field is expected.
SPECIAL = st.sampled_from([
    None, True, False, 0, -1, 1, 3, 2**31, 2**63, 10**30, -(10**30), 0.5, -0.5, 1e308, math.inf, -math.inf,
    math.nan, "", "x", "LORA", "all-linear", "q_proj", "..", "../../etc/passwd", "a/b", "(", "[", "*", "\u202e",
    "\x00", "sql\n", [], [1], ["q_proj"], [None], {}, {"q_proj": 3}, {"(": 2}, {"q_proj": "x"}, {"": None},
])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.recursive(
    SPECIAL | SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)

Path_ = tuple[Any, ...]


def json_paths(doc: Any, prefix: Path_ = ()) -> Iterator[Path_]:
    """Every path (tuple of keys / indices) in a JSON document, the root ``()`` first."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from json_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from json_paths(value, (*prefix, index))


def _parent(doc: Any, path: Path_) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


def field_name(path: Path_) -> str | None:
    """The last dict key of ``path`` (the field a message should name), ``None`` at the root."""
    keys = [part for part in path if isinstance(part, str)]
    return keys[-1] if keys else None


@st.composite
def mutated_json(draw: st.DrawFn, doc: Any) -> tuple[Any, Path_]:
    """A copy of ``doc`` with one field replaced, deleted or added: ``(new document, path changed)``."""
    new = copy.deepcopy(doc)
    path = draw(st.sampled_from(list(json_paths(new))))
    kind = draw(st.sampled_from(["replace", "delete", "add"]))
    target = _parent(new, path) if path else None
    if not path:
        return (draw(JSON_VALUES) if kind == "replace" else new), path
    if kind == "delete" and isinstance(target, (dict, list)):
        del target[path[-1]]
        return new, path
    if kind == "add" and isinstance(target, dict):
        key = draw(st.text(max_size=8))
        target[key] = draw(JSON_VALUES)
        return new, (*path[:-1], key)
    target[path[-1]] = draw(JSON_VALUES)
    return new, path


@st.composite
def damaged_text(draw: st.DrawFn, text: str) -> bytes:
    """``text``'s bytes truncated, with bytes flipped, or replaced by random bytes."""
    data = text.encode()
    kind = draw(st.sampled_from(["truncate", "flip", "random", "bom"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "bom":
        return b"\xef\xbb\xbf" + data
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


def fresh_copy(template: Path) -> Path:
    """A copy of the folder ``template`` inside a new temporary folder (one per example)."""
    target = Path(tempfile.mkdtemp(prefix="moa-fuzz-")) / template.name
    shutil.copytree(template, target)
    return target


def dump_json(doc: Any) -> str:
    """JSON text of ``doc`` (NaN and infinities written as Python's json writes them)."""
    return json.dumps(doc, indent=2)


# --- the properties -------------------------------------------------------------------------


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or ``link -> target``, ``dir``) of everything under ``folder``."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found[name] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def model_state(model: Any) -> tuple[Any, ...]:
    """Adapters, active adapters, router and a hash of every parameter and buffer of ``model``."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return tuple(model.adapter_names), tuple(model.active_adapters), model.router, digest.hexdigest()


def check_error(error: BaseException, names: tuple[str, ...], field: str | None = None) -> None:
    """Assert ``error`` is a MoaError whose message names one of ``names`` (the file) and ``field``."""
    assert isinstance(error, MoaError), f"{type(error).__name__} leaked: {error!r}"
    message = str(error)
    assert any(name in message for name in names), f"message names none of {names}: {message}"
    if field:
        assert field in message, f"message does not name the field {field!r}: {message}"


def expect_clean(
    action: Callable[[], Any], names: tuple[str, ...], field: str | None, unchanged: Callable[[], Any]
) -> Any:
    """Run ``action``: its result, or ``None`` after checking its error and that ``unchanged()`` is the same."""
    before = unchanged()
    try:
        return action()
    except Exception as error:  # noqa: BLE001 - the property: only MoaError may come out
        check_error(error, names, field)
        assert unchanged() == before, "state changed by a failed load"
        return None
