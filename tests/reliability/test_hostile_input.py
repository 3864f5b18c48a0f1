"""Limits and hostile input: each refused with a clear MoaError before any work starts.

Prompts past the base's context, enormous ``max_new_tokens``, ranks and adapter counts above
the caps, adapter names with path separators / ``..`` / control / bidi / look-alike characters,
symlinks out of an adapter folder, pickled weights (never unpickled), ``trust_remote_code``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import moa
from moa.errors import (
    AdapterFormatError,
    HubError,
    AdapterNameError,
    AdapterShapeError,
    BaseModelError,
    InputLimitError,
    ManifestError,
    MoaError,
    RoutingError,
    UnsafeFileError,
)
from moa.hub.manifest import MixtureManifest
from moa.model import adapter_io
from moa.routing.learned_gate import LearnedGate
from moa.testing.fixtures import make_tiny_model
from tests.reliability.fuzzing import folder_digest, model_state
from tests.reliability.test_fuzz_configs import MANIFEST

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def model(fuzz_model):
    """The module's tiny model; every test must leave it as it found it."""
    before = model_state(fuzz_model)
    yield fuzz_model
    assert model_state(fuzz_model) == before


@pytest.fixture
def folder(adapter_template, tmp_path):
    """A fresh copy of a valid adapter folder."""
    target = tmp_path / "adapter"
    shutil.copytree(adapter_template, target)
    return target


@pytest.fixture
def no_work(model, monkeypatch):
    """Fail the test if the model runs a forward or reads an adapter folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the input was refused")

    monkeypatch.setattr(model.base_model, "generate", refuse)
    monkeypatch.setattr(model.base_model, "forward", refuse)
    monkeypatch.setattr(adapter_io, "read_adapter", refuse)
    return model


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


# --- context, new tokens -----------------------------------------------------------------


def test_prompt_longer_than_the_context_is_refused(no_work):
    context = no_work.config.max_position_embeddings
    with pytest.raises(InputLimitError, match=rf"{context + 1} tokens, above this base's context of {context}"):
        no_work.generate(torch.ones(1, context + 1, dtype=torch.long), max_new_tokens=1)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 10**12}, {"max_new_tokens": 254}, {"max_length": 10**9},
                                    {"max_new_tokens": -1}, {"max_new_tokens": 2.5}])
def test_enormous_max_new_tokens_is_refused(no_work, kwargs):
    with pytest.raises(InputLimitError, match="max_new_tokens|max_length"):
        no_work.generate(torch.ones(1, 3, dtype=torch.long), **kwargs)


def test_generation_within_the_context_still_runs(model):
    out = model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=253, min_new_tokens=253,
                         do_sample=False, pad_token_id=257)
    assert out.shape == (1, 256)


# --- caps: rank, adapter count -----------------------------------------------------------


@pytest.mark.parametrize("changes", [{"r": 10**9}, {"r": 257}, {"rank_pattern": {"q_proj": 2**40}}])
def test_rank_above_the_cap_is_refused_before_anything_is_built(model, folder, changes, monkeypatch):
    edit_config(folder, **changes)
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda *a, **k: pytest.fail("a layer was built"))
    with pytest.raises(AdapterShapeError, match=r"adapter_config.json.*above the rank cap 256 \(max_rank=256\)"):
        model.load_adapter(folder, adapter_name="new")


def test_adapter_count_above_the_cap_is_refused(tiny_base_dir, folder, monkeypatch):
    small = moa.MixtureModel(make_tiny_model(tiny_base_dir).base_model, max_adapters=2)
    small.add_adapter("a", moa.LoraConfig(r=2, target_modules=["q_proj"]))
    small.load_adapter(folder, adapter_name="b")
    monkeypatch.setattr(adapter_io, "read_adapter", lambda *a: pytest.fail("the folder was read"))
    with pytest.raises(InputLimitError, match="holds 2 adapters, the cap max_adapters=2"):
        small.load_adapter(folder, adapter_name="c")
    with pytest.raises(InputLimitError, match="max_adapters=2"):
        small.add_adapter("c", moa.LoraConfig(r=2, target_modules=["q_proj"]))
    assert small.adapter_names == ["a", "b"]


# --- adapter names -------------------------------------------------------------------------

HOSTILE_NAMES = [
    "a/b", "..", "../x", "a\\b", "sql\n", "sql\x00", "sql\t", "sq l", "s.q", "",
    "\u0455ql",        # Cyrillic dze looks like an "s"
    "\uff53\uff51\uff4c",  # fullwidth "sql" (NFKC changes it)
    "sql\u202e",       # right-to-left override (bidi)
    "sql\u200b",       # zero-width space
    "\ufb01x",         # the "fi" ligature (not NFKC-normal)
    "x" * 129, "auto", "__base__", 7,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_adapter_names_are_refused_before_any_work(no_work, folder, name):
    with pytest.raises(AdapterNameError, match="adapter name"):
        no_work.load_adapter(folder, adapter_name=name)
    with pytest.raises(AdapterNameError, match="adapter name"):
        no_work.add_adapter(name, moa.LoraConfig(r=2, target_modules=["q_proj"]))


def test_a_name_error_names_the_character():
    from moa.model.adapter_bank import check_adapter_name

    with pytest.raises(AdapterNameError, match=r"U\+0455 CYRILLIC SMALL LETTER DZE"):
        check_adapter_name("\u0455ql")
    with pytest.raises(AdapterNameError, match=r"U\+000A"):
        check_adapter_name("sql\n")  # a trailing newline passed the old pattern ("^...$" with re.match)
    assert check_adapter_name("sql-v2_b") == "sql-v2_b"


@pytest.mark.parametrize("name", ["sql\n", "../x", "\u0455ql"], ids=repr)
def test_manifest_adapter_names_are_checked(name):
    doc = json.loads(json.dumps(MANIFEST))
    doc["adapters"][0]["name"] = name
    with pytest.raises(ManifestError, match=r"adapters\[0\]\.name"):
        MixtureManifest.from_dict(doc)


@pytest.mark.parametrize(("field", "value"), [("revision", "a" * 40 + "\n"), ("repo", "alice/sql\n"),
                                              ("repo", "alice/\u0455ql")], ids=repr)
def test_manifest_pins_are_exact(field, value):
    doc = json.loads(json.dumps(MANIFEST))
    doc["adapters"][0][field] = value
    with pytest.raises(ManifestError, match=rf"adapters\[0\]\.{field}"):
        MixtureManifest.from_dict(doc)


# --- symlinks --------------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["adapter_config.json", "adapter_model.safetensors", "moa.json"])
def test_symlink_out_of_the_folder_is_refused(model, folder, tmp_path, file_name):
    outside = tmp_path / "outside" / file_name
    outside.parent.mkdir()
    shutil.move(folder / file_name, outside)  # a valid file: only where it lives is wrong
    (folder / file_name).symlink_to(outside)
    before = folder_digest(folder)
    with pytest.raises(UnsafeFileError, match=r"symlink to .*outside the folder"):
        model.load_adapter(folder, adapter_name="new")
    assert folder_digest(folder) == before


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_symlink_to_an_endless_device_is_refused_without_reading(model, folder):
    (folder / "moa.json").unlink()
    (folder / "moa.json").symlink_to("/dev/zero")
    with pytest.raises(UnsafeFileError, match="/dev/zero"):
        model.load_adapter(folder, adapter_name="new")


def test_fifo_is_refused_without_blocking(model, folder):
    (folder / "moa.json").unlink()
    os.mkfifo(folder / "moa.json")
    with pytest.raises(AdapterFormatError, match="not a regular file"):
        model.load_adapter(folder, adapter_name="new")


def test_links_inside_the_folder_and_hf_cache_snapshots_still_load(model, adapter_template, tmp_path):
    repo = tmp_path / "models--alice--sql"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in adapter_template.iterdir():  # the HF cache layout: snapshot files link to ../../blobs/<hash>
        blob = repo / "blobs" / f"blob-{path.name}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    model.load_adapter(snapshot, adapter_name="new")
    model.delete_adapter("new")


# --- pickles ---------------------------------------------------------------------------------


class _Bomb:
    """Unpickling this writes a marker file (what a malicious pickle would do, harmlessly)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled!"))


@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "pytorch_model.bin"])
@pytest.mark.parametrize("keep_safetensors", [False, True])
def test_pickled_weights_are_never_unpickled(model, folder, tmp_path, pickle_name, keep_safetensors):
    marker = tmp_path / "marker"
    (folder / pickle_name).write_bytes(pickle.dumps(_Bomb(str(marker))))
    if not keep_safetensors:
        (folder / "adapter_model.safetensors").unlink()
        with pytest.raises(AdapterFormatError, match="pickle"):
            model.load_adapter(folder, adapter_name="new")
    else:  # the safetensors file is what loads; the pickle next to it is never opened
        model.load_adapter(folder, adapter_name="new")
        model.delete_adapter("new")
    assert not marker.exists()


def test_pickled_router_weights_are_refused(tmp_path):
    marker = tmp_path / "marker"
    folder = LearnedGate(["a"], hidden_size=64, mlp_hidden=0).save(tmp_path / "gate")
    (folder / "router.safetensors").unlink()
    (folder / "router.pt").write_bytes(pickle.dumps(_Bomb(str(marker))))
    with pytest.raises(RoutingError, match="router.safetensors"):
        LearnedGate.load(folder)
    assert not marker.exists()


# --- trust_remote_code -----------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, "yes", 1])
def test_trust_remote_code_in_an_adapter_config_is_refused(model, folder, value):
    edit_config(folder, trust_remote_code=value)
    with pytest.raises(UnsafeFileError, match="trust_remote_code"):
        model.load_adapter(folder, adapter_name="new")


def test_trust_remote_code_in_moa_json_and_router_config_is_refused(model, folder, tmp_path):
    (folder / "moa.json").write_text(json.dumps({"trust_remote_code": True}))
    with pytest.raises(UnsafeFileError, match=r"moa.json.*trust_remote_code"):
        model.load_adapter(folder, adapter_name="new")
    gate = LearnedGate(["a"], hidden_size=64, mlp_hidden=0).save(tmp_path / "gate")
    config = json.loads((gate / "router_config.json").read_text())
    (gate / "router_config.json").write_text(json.dumps({**config, "trust_remote_code": True}))
    with pytest.raises(UnsafeFileError, match=r"router_config.json.*trust_remote_code"):
        LearnedGate.load(gate)


def test_trust_remote_code_in_a_manifest_is_refused():
    with pytest.raises(ManifestError, match="trust_remote_code"):
        MixtureManifest.from_dict({**MANIFEST, "trust_remote_code": True})


@pytest.mark.parametrize("key", ["auto_map", "trust_remote_code"])
def test_a_base_asking_to_run_its_code_is_refused(tiny_base_dir, tmp_path, key):
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    config = json.loads((base / "config.json").read_text())
    config[key] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"} if key == "auto_map" else True
    (base / "config.json").write_text(json.dumps(config))
    (base / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(BaseModelError, match=rf"field {key}.*never does"):
        moa.MixtureModel.from_pretrained(base, quantization=None)


def test_every_refusal_is_a_moa_error():
    for error in (AdapterNameError, InputLimitError, UnsafeFileError, ManifestError, BaseModelError):
        assert issubclass(error, MoaError)


@pytest.mark.parametrize("repo_id", ["alice/sql\n", "alice/\u0455ql", "alice/sql lora", "\u0430lice/sql"])
def test_hub_repo_ids_are_ascii_and_whole(repo_id):
    """A trailing newline or a look-alike letter never passes for a Hub repo id."""
    from moa.hub.pull import check_repo_id

    with pytest.raises(HubError, match="is not a Hub repo id"):
        check_repo_id(repo_id)
