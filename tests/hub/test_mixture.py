"""Mixtures: push adapters + manifest, pull with every pin verified, all or nothing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import moa
from moa.errors import AdapterExistsError, BaseModelMismatchError, IntegrityError, ManifestError
from moa.hub import MixtureManifest, pull_mixture, push_adapter, push_mixture, push_router
from moa.hub.push import push_files
from moa.hub.verify import sha256_file
from moa.testing.fixtures import make_tiny_base
from tests.hub.conftest import add_lora, logits


def fresh_model(base_dir):
    return moa.MixtureModel(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval())


@pytest.fixture
def mixture(hub, tiny_model):
    """'alice/mix': adapters sql and code (pushed to alice/mix-sql, alice/mix-code)."""
    add_lora(tiny_model, "sql", seed=11)
    add_lora(tiny_model, "code", seed=12, r=2, targets=("k_proj", "up_proj"))
    result = push_mixture(tiny_model, "alice/mix")
    return tiny_model, result


def test_round_trip_loads_every_adapter_with_same_logits(hub, mixture, tiny_base_dir, input_ids):
    model, result = mixture
    manifest = MixtureManifest.from_json(_manifest_text(hub, "alice/mix"))
    assert [a.name for a in manifest.adapters] == ["sql", "code"]
    assert all(len(a.revision) == 40 and "adapter_model.safetensors" in a.files for a in manifest.adapters)
    assert manifest.base.fingerprint == model.base_fingerprint
    other = fresh_model(tiny_base_dir)
    pulled = pull_mixture("alice/mix", model=other)
    assert other.adapter_names == ["sql", "code"] and pulled.commit == result.oid
    for name in ("sql", "code"):
        torch.testing.assert_close(logits(other, input_ids, name), logits(model, input_ids, name), rtol=0, atol=0)
        folder = pulled.adapter_paths[name]
        pin = next(a for a in pulled.adapters if a.name == name)
        assert {n: sha256_file(folder / n) for n in pin.files} == pin.files
    commits = hub.count("POST", "/commit/")
    assert push_mixture(model, "alice/mix").oid == result.oid  # unchanged: no new commit anywhere
    assert hub.count("POST", "/commit/") == commits


def test_pins_hold_when_an_adapter_repo_moves_on(hub, mixture, tiny_base_dir, input_ids):
    model, _ = mixture
    before = logits(model, input_ids, "sql")
    model.delete_adapter("sql")
    add_lora(model, "sql", seed=99)
    push_adapter(model, "sql", "alice/mix-sql")  # main moves; the manifest still pins the old commit
    other = fresh_model(tiny_base_dir)
    pull_mixture("alice/mix", model=other)
    torch.testing.assert_close(logits(other, input_ids, "sql"), before, rtol=0, atol=0)


def test_other_base_fingerprint_raises_and_downloads_nothing(hub, mixture):
    other = moa.MixtureModel(make_tiny_base(intermediate_size=96))  # another base on purpose: other weights
    fetched = hub.count("GET", "/alice/mix-")
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        pull_mixture("alice/mix", model=other)
    assert other.adapter_names == [] and hub.count("GET", "/alice/mix-") == fetched


def test_one_tampered_adapter_loads_nothing(hub, mixture, tiny_base_dir):
    entry = hub.storage.resolve("alice/mix-code", "main").files["adapter_model.safetensors"]
    data = bytearray(hub.storage.blobs[entry.blob_key])
    data[100] ^= 0x01
    hub.storage.tamper("alice/mix-code", "adapter_model.safetensors", bytes(data))
    other = fresh_model(tiny_base_dir)
    with pytest.raises(IntegrityError):
        pull_mixture("alice/mix", model=other)
    assert other.adapter_names == []  # sql verified fine, but nothing was loaded


def test_wrong_pin_in_manifest_loads_nothing(hub, mixture, tiny_base_dir):
    document = json.loads(_manifest_text(hub, "alice/mix"))
    document["adapters"][1]["files"]["adapter_model.safetensors"] = "0" * 64
    push_files("alice/mix", {"moa_mixture.json": json.dumps(document).encode()})
    other = fresh_model(tiny_base_dir)
    with pytest.raises(IntegrityError, match="pinned"):
        pull_mixture("alice/mix", model=other)
    assert other.adapter_names == []


def test_taken_name_and_bad_manifest(hub, mixture, tiny_base_dir):
    other = fresh_model(tiny_base_dir)
    add_lora(other, "code", seed=1)
    with pytest.raises(AdapterExistsError, match="already loaded"):
        pull_mixture("alice/mix", model=other)
    assert other.adapter_names == ["code"]
    push_files("alice/broken", {"moa_mixture.json": b'{"format": "moa-mixture", "format_version": 1}'})
    with pytest.raises(ManifestError, match="base.fingerprint"):
        pull_mixture("alice/broken")
    bad_revision = json.loads(_manifest_text(hub, "alice/mix"))
    bad_revision["adapters"][0]["revision"] = "main"
    with pytest.raises(ManifestError, match="40-hex commit"):
        MixtureManifest.from_dict(bad_revision)


def test_router_is_pinned_and_pulled(hub, tiny_model, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "router"
    folder.mkdir()
    (folder / "router_config.json").write_text('{"num_adapters": 1}')
    save_file({"gate": torch.zeros(4, 1)}, folder / "router.safetensors")
    router = push_router(folder, "alice/router")
    add_lora(tiny_model, "only", seed=13)
    push_mixture(tiny_model, "alice/with-router", adapters={"only": "alice/only"}, router_repo="alice/router")
    manifest = pull_mixture("alice/with-router")
    assert manifest.router is not None and manifest.router.revision == router.oid
    assert sha256_file(manifest.router_path / "router.safetensors") == router.files["router.safetensors"]


def _manifest_text(hub, repo_id):
    entry = hub.storage.resolve(repo_id, "main").files["moa_mixture.json"]
    return hub.storage.blobs[entry.blob_key].decode()


def test_learned_gate_router_round_trips_through_a_mixture(hub, tiny_model, tiny_base_dir):
    learned_gate = pytest.importorskip("moa.routing.learned_gate")
    add_lora(tiny_model, "sql", seed=14)
    gate = learned_gate.LearnedGate(adapter_names=["sql"], hidden_size=64)  # default hidden_layer
    tiny_model.set_router(gate)
    push_mixture(tiny_model, "alice/gated", router_repo="alice/gated-router")  # pushed with gate.save()
    other = fresh_model(tiny_base_dir)
    manifest = pull_mixture("alice/gated", model=other)
    assert manifest.router.router_type == gate.name
    assert isinstance(other.router, learned_gate.LearnedGate) and other.adapter_names == ["sql"]


def test_unknown_router_type_loads_nothing(hub, tiny_model, tiny_base_dir, tmp_path):
    from safetensors.torch import save_file

    from moa.errors import UnknownPluginError

    folder = tmp_path / "router"
    folder.mkdir()
    (folder / "router_config.json").write_text('{"router": "not_installed"}')
    save_file({"w": torch.zeros(2)}, folder / "router.safetensors")
    push_router(folder, "alice/odd-router")
    add_lora(tiny_model, "x", seed=15)
    push_mixture(tiny_model, "alice/odd", router_repo="alice/odd-router")
    other = fresh_model(tiny_base_dir)
    with pytest.raises(UnknownPluginError, match="not_installed"):
        pull_mixture("alice/odd", model=other)
    assert other.adapter_names == [] and other.router is None
