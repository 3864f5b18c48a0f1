"""Unit checks of moa.hub.verify and the schema checker (no server)."""

from __future__ import annotations

import struct

import pytest

from moa.errors import AdapterFormatError, AdapterShapeError, IntegrityError, UnsafeFileError
from moa.hub.schema_check import SchemaDefinitionError, validate
from moa.hub.verify import (
    Limits,
    RemoteFile,
    check_adapter_config_ranks,
    check_file_name,
    check_listing,
    check_not_pickle,
    check_safetensors_header,
    verify_digests,
)


@pytest.mark.parametrize("name", ["../x", "a/../b", "/etc/passwd", "a\\b", "C:evil", "", "a//b", "./a", "~/x",
                                  "a/.", "x\x00y"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafeFileError, match="path traversal"):
        check_file_name(name)


@pytest.mark.parametrize("name", ["adapter_config.json", "sub/dir/file.safetensors", "..hidden", "a..b"])
def test_safe_names_pass(name):
    assert check_file_name(name) == name


@pytest.mark.parametrize("name", ["adapter_model.bin", "x.PT", "a/b.pkl", "m.ckpt", "w.pth"])
def test_pickles_are_refused(name):
    with pytest.raises(UnsafeFileError, match="pickle"):
        check_not_pickle(name)


def test_listing_caps():
    files = [RemoteFile("a.json", 10), RemoteFile("b.safetensors", 50)]
    assert check_listing(files, Limits(max_file_bytes=50, max_total_bytes=60), "repo") == files
    with pytest.raises(UnsafeFileError, match="above the cap of 40"):
        check_listing(files, Limits(max_file_bytes=40), "repo")
    with pytest.raises(UnsafeFileError, match="holds 60 bytes"):
        check_listing(files, Limits(max_total_bytes=59), "repo")
    with pytest.raises(UnsafeFileError, match="path traversal"):
        check_listing([RemoteFile("../a", 1)], Limits(), "repo")


def test_rank_caps_from_config():
    check_adapter_config_ranks({"r": 8, "rank_pattern": {"q_proj": 16}}, 16, "x")
    with pytest.raises(AdapterShapeError, match=r"rank_pattern\['q_proj'\] = 32"):
        check_adapter_config_ranks({"r": 8, "rank_pattern": {"q_proj": 32}}, 16, "x")
    with pytest.raises(AdapterShapeError, match="not a positive integer"):
        check_adapter_config_ranks({"r": "8"}, 16, "x")


def test_safetensors_header_checks(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(8, 4), "y.lora_B.weight": torch.zeros(4, 8)}, good)
    assert "y.lora_B.weight" in check_safetensors_header(good, 8, "t")
    with pytest.raises(AdapterShapeError, match="rank 8"):
        check_safetensors_header(good, 4, "t")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(AdapterFormatError, match="not a valid safetensors"):
        check_safetensors_header(bad, None, "t")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-16])
    with pytest.raises(AdapterFormatError, match="outside the data"):
        check_safetensors_header(truncated, None, "t")


def test_verify_digests_names_every_problem(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    with pytest.raises(IntegrityError, match="'a' has sha256 .*'b' is missing"):
        verify_digests(tmp_path, {"a": "0" * 64, "b": "1" * 64}, "test")


def test_schema_checker_messages():
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 1}, "tags": {"type": "array", "uniqueItems": True,
                                                                              "items": {"enum": ["a", "b"]}}}}
    assert validate({"n": 2, "tags": ["a"]}, schema) == []
    errors = validate({"n": 0, "tags": ["a", "a", "c"], "x": 1}, schema)
    assert any("/n: 0 is less than 1" in e for e in errors)
    assert any("items must be unique" in e for e in errors) and any("/tags/2" in e for e in errors)
    assert any("/x: unexpected property" in e for e in errors)
    assert validate({}, schema) == ["/: missing required property 'n'"]
    assert validate(True, {"type": "integer"}) != []  # bool is not an integer
    # jsonschema does the checking: every keyword works (not only a hand-picked subset) ...
    conditional = {"if": {"required": ["a"]}, "then": {"required": ["b"]}}
    assert validate({"a": 1}, conditional) == ["/: missing required property 'b'"] and validate({}, conditional) == []
    # ... and a schema that is itself invalid is refused, naming where.
    with pytest.raises(SchemaDefinitionError, match="invalid at /type"):
        validate({}, {"type": "nonsense"})
