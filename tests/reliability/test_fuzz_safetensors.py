"""Byte-level fuzzing of safetensors files: header length, dtype, shape, data_offsets, truncation, data.

Adapter weights (``adapter_model.safetensors``, through ``MixtureModel.load_adapter``), the
learned gate's ``router.safetensors`` and the header check run on every Hub download
(:func:`moa.hub.verify.check_safetensors_header`): each damaged file loads and works, or raises
a MoaError naming the file (and, for a damaged header field, the field), and nothing changed.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moa.errors import AdapterFormatError, MoaError
from moa.hub.verify import check_safetensors_header
from moa.routing.learned_gate import LearnedGate
from tests.reliability.fuzzing import (
    field_name,
    folder_digest,
    fresh_copy,
    fuzz_settings,
    model_state,
    mutated_json,
)

pytestmark = pytest.mark.timeout(300)

HEADER_FIELDS = ("dtype", "shape", "data_offsets", "__metadata__")


def split(raw: bytes) -> tuple[dict, bytes]:
    """``(header, data)`` of a safetensors file's bytes."""
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: object, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def damaged_safetensors(draw: st.DrawFn, raw: bytes) -> tuple[bytes, str | None]:
    """A damaged copy of a safetensors file: ``(bytes, the header field changed or None)``."""
    header, data = split(raw)
    kind = draw(st.sampled_from(["field", "field", "length", "truncate", "data", "header_bytes", "append"]))
    if kind == "field":  # one header field (dtype, shape, data_offsets, metadata...) replaced, deleted or added
        new, path = draw(mutated_json(header))
        field = field_name(path)
        return join(new, data), field if field in HEADER_FIELDS else None
    if kind == "length":  # the 8-byte header length
        length = draw(st.sampled_from([0, 1, 7, 2**63, 2**64 - 1, len(raw), len(raw) - 8])
                      | st.integers(0, 2**64 - 1))
        return struct.pack("<Q", length) + raw[8:], "header length"
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))], None
    if kind == "append":
        return raw + draw(st.binary(min_size=1, max_size=16)), None
    if kind == "header_bytes":  # raw bytes flipped inside the header text
        length = len(raw) - len(data) - 8
        position = draw(st.integers(8, 8 + length - 1))
        return raw[:position] + bytes([draw(st.integers(0, 255))]) + raw[position + 1 :], None
    # data bytes flipped: may make NaN/inf values, or just other numbers
    buffer = bytearray(raw)
    start = len(raw) - len(data)
    for _ in range(draw(st.integers(1, 8))):
        buffer[draw(st.integers(start, len(raw) - 1))] = draw(st.sampled_from([0xFF, 0x7F, 0x80, 0x00]) |
                                                              st.integers(0, 255))
    return bytes(buffer), None


def check_message(error: BaseException, file_name: str, field: str | None, content: bytes) -> None:
    assert isinstance(error, MoaError), f"{type(error).__name__} leaked for {content[:200]!r}: {error!r}"
    assert file_name in str(error), str(error)
    if field and isinstance(error, AdapterFormatError):
        assert field in str(error) or "header" in str(error), f"field {field!r} not named: {error}"


@given(data=st.data())
@fuzz_settings(ci_examples=600)
def test_fuzz_adapter_safetensors(fuzz_model, adapter_template, data):
    folder = fresh_copy(adapter_template)
    weights = folder / "adapter_model.safetensors"
    content, field = data.draw(damaged_safetensors(weights.read_bytes()))
    weights.write_bytes(content)
    before_files, before_model = folder_digest(folder), model_state(fuzz_model)
    try:
        fuzz_model.load_adapter(folder, adapter_name="new")
    except Exception as error:  # noqa: BLE001 - the property: only MoaError may come out
        check_message(error, "adapter_model.safetensors", field, content)
    else:  # it loaded: its weights are finite numbers small enough for the compute dtype, and it runs
        try:
            layers = fuzz_model.adapter_layers("new").values()
            assert all(torch.isfinite(p).all() for layer in layers for p in layer.parameters())
            with torch.no_grad():
                logits = fuzz_model(torch.tensor([[1, 2, 3]]), adapter_names=["new"], check_finite=False).logits
            assert logits.shape == (1, 3, 258)
            assert torch.isfinite(logits).all(), "a folder that loads gave non-finite logits on a fixed prompt"
        finally:
            fuzz_model.delete_adapter("new")
    assert model_state(fuzz_model) == before_model
    assert folder_digest(folder) == before_files
    shutil.rmtree(folder.parent)


@given(data=st.data())
@fuzz_settings(ci_examples=500)
def test_fuzz_header_check_of_downloads(adapter_template, data):
    """The check every pulled safetensors file goes through before it is loaded."""
    folder = Path(tempfile.mkdtemp(prefix="moa-fuzz-"))
    path = folder / "adapter_model.safetensors"
    content, field = data.draw(damaged_safetensors((adapter_template / path.name).read_bytes()))
    path.write_bytes(content)
    try:
        header = check_safetensors_header(path, 8, "alice/sql-lora")
    except Exception as error:  # noqa: BLE001
        check_message(error, "adapter_model.safetensors", field, content)
    else:  # a header that passes the check is one safetensors itself reads
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            assert set(handle.keys()) == set(header) - {"__metadata__"}
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def gate_template(tmp_path_factory):
    torch.manual_seed(0)
    return LearnedGate(["good"], hidden_size=64, hidden_layer=2, mlp_hidden=8).save(
        tmp_path_factory.mktemp("gate") / "gate")


@given(data=st.data())
@fuzz_settings(ci_examples=300)
def test_fuzz_router_safetensors(fuzz_model, gate_template, data):
    folder = fresh_copy(gate_template)
    weights = folder / "router.safetensors"
    content, field = data.draw(damaged_safetensors(weights.read_bytes()))
    weights.write_bytes(content)
    before = folder_digest(folder)
    try:
        gate = LearnedGate.load(folder)
    except Exception as error:  # noqa: BLE001
        assert isinstance(error, MoaError), f"{type(error).__name__} leaked for {content[:200]!r}: {error!r}"
        assert "router.safetensors" in str(error), str(error)
    else:
        assert fuzz_model.route(["select the rows"], router=gate)[0].keys() <= {"good"}
    assert folder_digest(folder) == before
    del field
    shutil.rmtree(folder.parent)

