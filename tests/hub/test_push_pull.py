"""Pushing and pulling adapters and routers through the real huggingface_hub client."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from transformers import LlamaForCausalLM

import moa
from moa.errors import AdapterFormatError, AdapterShapeError, HubError, IntegrityError, UnsafeFileError
from moa.hub import pull_adapter, pull_router, push_adapter, push_router
from moa.hub.model_card import read_card_metadata
from moa.hub.verify import sha256_file
from tests.hub.conftest import add_lora, go_offline, logits

peft = pytest.importorskip("peft")


def fresh_model(base_dir):
    return moa.MixtureModel(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval())


def test_push_then_pull_same_logits_in_moa_and_peft(hub, upload_mode, tiny_model, tiny_base_dir, input_ids):
    add_lora(tiny_model, "sql", seed=1)
    result = push_adapter(tiny_model, "sql", "alice/sql-lora", domains=["sql"], metrics={"exact_match": 0.5})
    assert len(result.oid) == 40 and result.commit_url.endswith(result.oid)
    assert set(result.files) == {"adapter_config.json", "adapter_model.safetensors", "moa.json", "README.md"}
    assert hub.count("POST", "/commit/") == 1  # one commit per push
    assert (hub.count("PUT", "/_lfs/upload/") > 0) == (upload_mode == "lfs")

    folder = pull_adapter("alice/sql-lora")
    assert {p.name for p in folder.iterdir()} == set(result.files)
    assert {n: sha256_file(folder / n) for n in result.files} == result.files
    other = fresh_model(tiny_base_dir)
    other.load_adapter("alice/sql-lora", adapter_name="sql")  # the verified pull, inside load_adapter
    expected = logits(tiny_model, input_ids, "sql")
    torch.testing.assert_close(logits(other, input_ids, "sql"), expected, rtol=0, atol=0)

    base = LlamaForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base, "alice/sql-lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)

    card = read_card_metadata((folder / "README.md").read_text())
    assert card["library_name"] == "peft" and "moa" in card["tags"] and card["domains"] == ["sql"]
    assert card["moa"]["base_fingerprint"] == tiny_model.base_fingerprint
    assert card["model-index"][0]["results"][0]["metrics"][0] == {"type": "exact_match", "value": 0.5}


def test_pushing_the_same_adapter_again_is_a_no_op(hub, tiny_model):
    add_lora(tiny_model, "a", seed=2)
    first = push_adapter(tiny_model, "a", "alice/a")
    again = push_adapter(tiny_model, "a", "alice/a")
    assert again.oid == first.oid and again.files == first.files
    assert hub.count("POST", "/commit/") == 1


def test_big_router_goes_through_lfs_multipart(hub, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "router"
    folder.mkdir()
    (folder / "router_config.json").write_text(json.dumps({"name": "my_gate", "num_adapters": 2}))
    save_file({"w": torch.randn(11 * 1024 * 1024 // 4)}, folder / "router.safetensors")  # 11 MB
    result = push_router(folder, "alice/gate")
    assert hub.count("PUT", "/_lfs/part/") >= 2 and hub.count("POST", "/_lfs/verify") == 1
    pulled = pull_router("alice/gate", cache_dir=hub.cache_dir)
    assert sha256_file(pulled / "router.safetensors") == result.files["router.safetensors"]
    assert read_card_metadata((pulled / "README.md").read_text())["library_name"] == "moa"


def test_push_to_branch_and_pull_at_tag_and_old_commit(hub, tiny_model, tiny_base_dir, input_ids):
    add_lora(tiny_model, "v", seed=3)
    v1 = push_adapter(tiny_model, "v", "alice/v")
    HfApi().create_tag("alice/v", tag="v1")
    tiny_model.delete_adapter("v")
    add_lora(tiny_model, "v", seed=4)
    v2 = push_adapter(tiny_model, "v", "alice/v", commit_message="v2")
    dev = push_adapter(tiny_model, "v", "alice/v", revision="dev")  # branch created from main
    assert v1.oid != v2.oid and dev.revision == "dev"
    refs = HfApi().list_repo_refs("alice/v")
    assert {b.name for b in refs.branches} == {"main", "dev"} and refs.tags[0].target_commit == v1.oid

    weights = "adapter_model.safetensors"
    assert sha256_file(pull_adapter("alice/v", revision="v1") / weights) == v1.files[weights]
    assert sha256_file(pull_adapter("alice/v", revision=v1.oid) / weights) == v1.files[weights]
    assert sha256_file(pull_adapter("alice/v") / weights) == v2.files[weights]
    old = fresh_model(tiny_base_dir)
    old.load_adapter("alice/v", adapter_name="v", revision="v1")
    assert not torch.allclose(logits(old, input_ids, "v"), logits(tiny_model, input_ids, "v"))


def test_branch_only_adapter_is_not_on_main(hub, tiny_model):
    add_lora(tiny_model, "b", seed=5)
    push_adapter(tiny_model, "b", "alice/b", revision="feature/x")
    with pytest.raises(AdapterFormatError, match="has no adapter_config.json"):
        pull_adapter("alice/b")
    assert pull_adapter("alice/b", revision="feature/x").is_dir()


def test_tampered_file_raises_and_loads_nothing(hub, upload_mode, tiny_model, tiny_base_dir):
    add_lora(tiny_model, "t", seed=6)
    push_adapter(tiny_model, "t", "alice/t")
    data = bytearray(hub.storage.blobs[_entry(hub, "alice/t", "adapter_model.safetensors").blob_key])
    data[-1] ^= 0xFF  # same size, one byte flipped
    hub.storage.tamper("alice/t", "adapter_model.safetensors", bytes(data))
    other = fresh_model(tiny_base_dir)
    with pytest.raises(IntegrityError, match="tampered"):
        other.load_adapter("alice/t", adapter_name="t")
    assert other.adapter_names == []
    bad = _entry(hub, "alice/t", "adapter_model.safetensors")
    assert not (hub.cache_dir / "models--alice--t" / "blobs" / bad.etag).exists()  # evicted from the cache
    assert not list(hub.cache_dir.glob("models--alice--t/snapshots/*/adapter_model.safetensors"))


def test_path_traversal_in_listing_is_refused_before_download(hub, tiny_model):
    add_lora(tiny_model, "p", seed=7)
    push_adapter(tiny_model, "p", "alice/p")
    hub.storage.inject_file("alice/p", "../../evil.json", b"{}")
    downloads = hub.count("GET", "/resolve/")
    with pytest.raises(UnsafeFileError, match="path traversal"):
        pull_adapter("alice/p", cache_dir=hub.cache_dir)
    assert hub.count("GET", "/resolve/") == downloads


def test_pickle_weights_are_refused_and_other_pickles_never_fetched(hub, tiny_model, tmp_path):
    add_lora(tiny_model, "k", seed=8)
    tiny_model.save_adapter("k", tmp_path / "k")
    api = HfApi()
    api.create_repo("alice/pickled")
    api.create_commit("alice/pickled", commit_message="pickle", operations=[
        CommitOperationAdd("adapter_config.json", str(tmp_path / "k" / "adapter_config.json")),
        CommitOperationAdd("adapter_model.bin", b"\x80\x04pickle"),
    ])
    with pytest.raises(UnsafeFileError, match="pickle"):
        pull_adapter("alice/pickled")
    push_adapter(tiny_model, "k", "alice/mixed")
    api.create_commit("alice/mixed", commit_message="extra", operations=[
        CommitOperationAdd("training_args.bin", b"\x80\x04pickle")])
    folder = pull_adapter("alice/mixed")
    assert not (folder / "training_args.bin").exists()
    assert hub.count("GET", "training_args.bin") == 0


def test_offline_pull_reads_the_verified_cache_only(hub, tiny_model, monkeypatch):
    add_lora(tiny_model, "o", seed=9)
    result = push_adapter(tiny_model, "o", "alice/o")
    online = pull_adapter("alice/o")
    go_offline(monkeypatch)
    before = len(hub.storage.requests)
    offline = pull_adapter("alice/o")
    assert offline == online and len(hub.storage.requests) == before
    assert sha256_file(offline / "adapter_model.safetensors") == result.files["adapter_model.safetensors"]
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        pull_adapter("alice/never-pulled")
    blob = (offline / "adapter_model.safetensors").resolve()  # corrupt the cache itself
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError):
        pull_adapter("alice/o")


def test_caps_and_missing_things(hub, tiny_model, monkeypatch):
    add_lora(tiny_model, "c", seed=10, r=8)
    push_adapter(tiny_model, "c", "alice/c")
    with pytest.raises(AdapterShapeError, match="rank cap 4"):
        pull_adapter("alice/c", max_rank=4)
    monkeypatch.setenv("MOA_HUB_MAX_FILE_BYTES", "100")
    with pytest.raises(UnsafeFileError, match="above the cap"):
        pull_adapter("alice/c")
    monkeypatch.delenv("MOA_HUB_MAX_FILE_BYTES")
    with pytest.raises(HubError, match="no such repo"):
        pull_adapter("alice/nope")
    with pytest.raises(HubError, match="revision does not exist"):
        pull_adapter("alice/c", revision="v9")
    with pytest.raises(HubError, match="not a Hub repo id"):
        pull_adapter("../c")
    with pytest.raises(HubError, match="branch name"):
        push_adapter(tiny_model, "c", "alice/c", revision="a" * 40)


def _entry(hub, repo_id, path):
    return hub.storage.resolve(repo_id, "main").files[path]
