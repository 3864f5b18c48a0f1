"""PEFT's multi-adapter layout (save_pretrained / push_to_hub) for a MixtureModel, checked with real PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import moa
from moa.errors import (
    AdapterError,
    AdapterExistsError,
    AdapterFormatError,
    HubError,
    IntegrityError,
    UnknownAdapterError,
)
from moa.hub.model_card import read_card_metadata
from moa.hub.pretrained import INDEX_NAME, load_pretrained_adapters, push_to_hub, read_index, save_pretrained
from moa.hub.verify import sha256_file
from tests.hub.conftest import add_lora, logits

peft = pytest.importorskip("peft")

#: Three adapters with different ranks and targets; "sql" is added first (slot 0).
ADAPTERS = {
    "sql": dict(r=4, targets=("q_proj", "v_proj", "down_proj")),
    "code": dict(r=8, targets=("k_proj", "o_proj", "up_proj")),
    "math": dict(r=2, targets=("q_proj", "gate_proj")),
}
ROOT_FILES = {"adapter_config.json", "adapter_model.safetensors", "moa.json"}


def fresh_base(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def fresh_model(base_dir):
    return moa.MixtureModel(fresh_base(base_dir))


def add_three(model) -> None:
    for seed, (name, spec) in enumerate(ADAPTERS.items(), start=10):
        add_lora(model, name, seed=seed, r=spec["r"], targets=spec["targets"])


def tree(folder) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def peft_logits(peft_model, input_ids, name: str) -> torch.Tensor:
    peft_model.set_adapter(name)
    with torch.no_grad():
        return peft_model(input_ids).logits


@pytest.fixture
def three(tiny_model):
    add_three(tiny_model)
    return tiny_model


# --- the layout ------------------------------------------------------------------------------


def test_first_adapter_at_root_others_in_subfolders_with_index(three, tmp_path):
    out = save_pretrained(three, tmp_path / "all")
    assert out == tmp_path / "all"
    assert {p.name for p in out.iterdir()} == ROOT_FILES | {INDEX_NAME, "code", "math"}
    for name in ("code", "math"):
        assert {p.name for p in (out / name).iterdir()} == ROOT_FILES
        assert json.loads((out / name / "adapter_config.json").read_text())["r"] == ADAPTERS[name]["r"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == ADAPTERS["sql"]["r"]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["format"] == 1
    assert list(index["adapters"].items()) == [("sql", "."), ("code", "code"), ("math", "math")]
    assert index["active"] == ["sql"]
    assert index["files"] == {
        path: sha256_file(out / path) for path in tree(out) if path != INDEX_NAME
    }
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.rglob("*"))
    assert [p.name for p in tmp_path.iterdir()] == ["all"]  # no temp folder left beside it


def test_peft_loads_every_adapter_with_the_same_logits(three, tiny_base_dir, tmp_path, input_ids):
    save_pretrained(three, tmp_path / "all")
    peft_model = peft.PeftModel.from_pretrained(fresh_base(tiny_base_dir), tmp_path / "all", adapter_name="sql")
    peft_model.load_adapter(str(tmp_path / "all" / "code"), adapter_name="code")
    peft_model.load_adapter(str(tmp_path / "all"), adapter_name="math", subfolder="math")  # PEFT's kwarg
    peft_model.eval()
    assert set(peft_model.peft_config) == set(ADAPTERS)
    base = logits(three, input_ids, None)
    for name, spec in ADAPTERS.items():
        assert peft_model.peft_config[name].r == spec["r"]
        expected = logits(three, input_ids, name)
        assert not torch.allclose(expected, base)  # random, non-zero adapters
        torch.testing.assert_close(peft_logits(peft_model, input_ids, name), expected, rtol=0, atol=1e-5)


def test_load_pretrained_adapters_round_trip(three, tiny_base_dir, tmp_path, input_ids):
    three.set_adapter(["code", "math"])
    save_pretrained(three, tmp_path / "all")
    other = fresh_model(tiny_base_dir)
    assert load_pretrained_adapters(other, tmp_path / "all") == ["sql", "code", "math"]
    assert other.adapter_names == ["sql", "code", "math"]
    assert other.active_adapters == ["code", "math"]  # restored into a model that had no adapters
    for name in ADAPTERS:
        assert other.peft_config[name].r == ADAPTERS[name]["r"]
        torch.testing.assert_close(logits(other, input_ids, name), logits(three, input_ids, name), rtol=0, atol=0)
    rows = ["math", None, "sql", "code"]
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids, adapter_names=rows).logits,
                                   three(input_ids, adapter_names=rows).logits, rtol=0, atol=0)


def test_loading_into_a_model_with_adapters_keeps_its_active_ones(three, tiny_base_dir, tmp_path):
    save_pretrained(three, tmp_path / "all", selected_adapters=["code"])
    other = fresh_model(tiny_base_dir)
    add_lora(other, "own", seed=1)
    assert load_pretrained_adapters(other, tmp_path / "all") == ["code"]
    assert other.adapter_names == ["own", "code"] and other.active_adapters == ["own"]


def test_selected_adapters_subset_in_the_given_order(three, tiny_base_dir, tmp_path, input_ids):
    out = save_pretrained(three, tmp_path / "two", selected_adapters=["math", "sql"])
    assert {p.name for p in out.iterdir()} == ROOT_FILES | {INDEX_NAME, "sql"}
    assert read_index(out).adapters == {"math": ".", "sql": "sql"}
    assert read_index(out).active == ("sql",)  # the active adapters among the saved ones
    peft_model = peft.PeftModel.from_pretrained(fresh_base(tiny_base_dir), out, adapter_name="math").eval()
    torch.testing.assert_close(peft_logits(peft_model, input_ids, "math"), logits(three, input_ids, "math"),
                               rtol=0, atol=1e-5)
    other = fresh_model(tiny_base_dir)
    assert load_pretrained_adapters(other, out) == ["math", "sql"]
    save_pretrained(three, tmp_path / "one", selected_adapters="code")  # one name as a string
    assert read_index(tmp_path / "one").adapters == {"code": "."}


def test_unknown_selected_adapter_lists_the_loaded_ones(three, tmp_path):
    with pytest.raises(UnknownAdapterError, match=r"'nope'.*Loaded: code, math, sql"):
        save_pretrained(three, tmp_path / "x", selected_adapters=["sql", "nope"])
    assert not (tmp_path / "x").exists()


def test_nothing_to_save_is_a_clear_error(three, tiny_base_dir, tmp_path):
    with pytest.raises(AdapterError, match="no adapters"):
        save_pretrained(fresh_model(tiny_base_dir), tmp_path / "x")
    with pytest.raises(AdapterError, match="selected_adapters is empty"):
        save_pretrained(three, tmp_path / "x", selected_adapters=[])
    assert list(tmp_path.iterdir()) == []


def test_peft_keyword_arguments(three, tmp_path):
    with pytest.raises(AdapterError, match="safetensors only"):
        save_pretrained(three, tmp_path / "x", safe_serialization=False)
    with pytest.raises(AdapterError, match="selected_adapter"):
        save_pretrained(three, tmp_path / "x", selected_adapter=["sql"])  # misspelled: not silently "all"
    assert save_pretrained(three, tmp_path / "x", is_main_process=False) == tmp_path / "x"
    assert not (tmp_path / "x").exists()
    save_pretrained(three, tmp_path / "x", safe_serialization=True, save_embedding_layers="auto")
    assert read_index(tmp_path / "x").adapters == {"sql": ".", "code": "code", "math": "math"}


def test_subfolder_names_that_cannot_work_are_refused(tiny_model, tmp_path):
    add_lora(tiny_model, "root", seed=1)
    add_lora(tiny_model, "code", seed=2)
    add_lora(tiny_model, "Code", seed=3)
    with pytest.raises(AdapterError, match="differ only in case"):
        save_pretrained(tiny_model, tmp_path / "x")  # code/ and Code/ are one folder on macOS
    assert not (tmp_path / "x").exists()
    save_pretrained(tiny_model, tmp_path / "x", selected_adapters=["code", "Code"])  # one at the root: fine
    assert read_index(tmp_path / "x").adapters == {"code": ".", "Code": "Code"}
    save_pretrained(tiny_model, tmp_path / "x", selected_adapters=["root"])
    (tmp_path / "x" / "Code").mkdir()
    (tmp_path / "x" / "Code" / "notes.txt").write_text("mine")  # not an adapter folder
    before = tree(tmp_path / "x")
    with pytest.raises(AdapterError, match="not an adapter folder"):
        save_pretrained(tiny_model, tmp_path / "x", selected_adapters=["root", "Code"])
    assert tree(tmp_path / "x") == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        save_pretrained(tiny_model, tmp_path / "file")


def test_the_working_directory_is_not_replaced(three, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    for target in (".", tmp_path, tmp_path.parent):
        with pytest.raises(AdapterError, match="working directory"):
            save_pretrained(three, target)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    save_pretrained(three, "adapters")  # a subfolder of it is fine
    assert (tmp_path / "adapters" / INDEX_NAME).is_file()


# --- atomicity -------------------------------------------------------------------------------


def test_failure_midway_leaves_the_old_folder_intact_and_no_temp(three, tmp_path, monkeypatch):
    out = tmp_path / "all"
    save_pretrained(three, out, selected_adapters=["code", "math"])
    (out / "tokenizer.json").write_text("{}")
    before = tree(out)
    real_save = three.save_adapter
    calls = []

    def failing_save(name, directory):
        calls.append(name)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(name, directory)

    monkeypatch.setattr(three, "save_adapter", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(three, out)
    assert calls == ["sql", "code"]  # the root adapter was written, the second one failed
    assert tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["all"]


def test_saving_again_replaces_adapters_and_keeps_other_files(three, tiny_base_dir, tmp_path):
    out = tmp_path / "all"
    save_pretrained(three, out)
    (out / "tokenizer.json").write_text('{"mine": 1}')
    (out / "extra").mkdir()
    (out / "extra" / "notes.md").write_text("keep me")
    three.save_adapter("sql", out / "checkpoint-1")  # e.g. a Trainer checkpoint: not listed in the index
    (out / "checkpoint-1" / "optimizer.safetensors").write_bytes(b"state")
    save_pretrained(three, out, selected_adapters=["math", "code"])
    assert {p.name for p in out.iterdir()} == ROOT_FILES | {INDEX_NAME, "code", "extra", "tokenizer.json",
                                                            "checkpoint-1"}
    assert (out / "tokenizer.json").read_text() == '{"mine": 1}'
    assert (out / "extra" / "notes.md").read_text() == "keep me"
    assert (out / "checkpoint-1" / "optimizer.safetensors").read_bytes() == b"state"
    assert json.loads((out / "adapter_config.json").read_text())["r"] == ADAPTERS["math"]["r"]
    assert load_pretrained_adapters(fresh_model(tiny_base_dir), out) == ["math", "code"]
    assert [p.name for p in tmp_path.iterdir()] == ["all"]


# --- loading ---------------------------------------------------------------------------------


def test_load_is_all_or_nothing(three, tiny_base_dir, tmp_path):
    out = save_pretrained(three, tmp_path / "all")
    (out / "math" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    other = fresh_model(tiny_base_dir)
    with pytest.raises(AdapterFormatError):
        load_pretrained_adapters(other, out)
    assert other.adapter_names == [] and other.active_adapters == []

    taken = fresh_model(tiny_base_dir)
    add_lora(taken, "code", seed=3)
    save_pretrained(three, tmp_path / "ok")
    with pytest.raises(AdapterExistsError, match=r"'code'.*Nothing was loaded"):
        load_pretrained_adapters(taken, tmp_path / "ok")
    assert taken.adapter_names == ["code"]


def test_reads_a_layout_written_by_peft(tiny_base_dir, tmp_path, input_ids):
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(
        fresh_base(tiny_base_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    torch.manual_seed(1)
    peft_model.add_adapter("two", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["down_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()
    model = fresh_model(tiny_base_dir)
    assert load_pretrained_adapters(model, tmp_path / "peft") == ["default", "two"]
    for name in ("default", "two"):
        torch.testing.assert_close(logits(model, input_ids, name), peft_logits(peft_model, input_ids, name),
                                   rtol=0, atol=1e-5)


def test_damaged_index_is_a_clear_error(three, tiny_base_dir, tmp_path):
    out = save_pretrained(three, tmp_path / "all")
    index = json.loads((out / INDEX_NAME).read_text())
    (out / INDEX_NAME).write_text(json.dumps({**index, "adapters": {"sql": "../elsewhere"}}))
    with pytest.raises(AdapterFormatError, match="folder of adapter 'sql'"):
        load_pretrained_adapters(fresh_model(tiny_base_dir), out)
    (out / INDEX_NAME).write_text(json.dumps({**index, "format": 99}))
    with pytest.raises(AdapterFormatError, match="format 99"):
        read_index(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFormatError, match="holds no adapter"):
        read_index(tmp_path / "empty")


# --- the Hub ---------------------------------------------------------------------------------


def test_push_to_hub_then_peft_and_moa_load_it(hub, three, tiny_base_dir, input_ids):
    from huggingface_hub import snapshot_download

    result = push_to_hub(three, "alice/domains", license="apache-2.0")
    assert len(result.oid) == 40 and result.commit_url.endswith(result.oid) and result.revision == "main"
    assert hub.count("POST", "/commit/") == 1  # the whole layout in one commit
    assert set(result.files) == ROOT_FILES | {INDEX_NAME, "README.md"} | {
        f"{sub}/{name}" for sub in ("code", "math") for name in ROOT_FILES
    }

    folder = snapshot_download("alice/domains", cache_dir=hub.cache_dir)
    peft_model = peft.PeftModel.from_pretrained(fresh_base(tiny_base_dir), folder, adapter_name="sql")
    peft_model.load_adapter(f"{folder}/code", adapter_name="code")
    peft_model.load_adapter("alice/domains", adapter_name="math", subfolder="math")  # straight from the Hub
    peft_model.eval()
    for name in ADAPTERS:
        torch.testing.assert_close(peft_logits(peft_model, input_ids, name), logits(three, input_ids, name),
                                   rtol=0, atol=1e-5)

    other = fresh_model(tiny_base_dir)
    assert load_pretrained_adapters(other, "alice/domains", revision=result.oid) == ["sql", "code", "math"]
    for name in ADAPTERS:
        torch.testing.assert_close(logits(other, input_ids, name), logits(three, input_ids, name), rtol=0, atol=0)

    card_text = (hub.cache_dir / "models--alice--domains" / "snapshots" / result.oid / "README.md").read_text()
    card = read_card_metadata(card_text)
    assert card["library_name"] == "peft" and card["license"] == "apache-2.0"
    assert card["moa"]["adapters"] == ["sql", "code", "math"] and "multi-adapter" in card["tags"]
    assert 'subfolder="code"' in card_text


def test_push_subset_to_a_branch(hub, three, tiny_base_dir):
    result = push_to_hub(three, "alice/pair", selected_adapters=["code", "sql"], revision="dev",
                         commit_message="two of them")
    assert result.revision == "dev"
    other = fresh_model(tiny_base_dir)
    assert load_pretrained_adapters(other, "alice/pair", revision="dev") == ["code", "sql"]
    with pytest.raises(HubError, match="branch"):
        push_to_hub(three, "alice/pair", revision="a" * 40)
    with pytest.raises(UnknownAdapterError):
        push_to_hub(three, "alice/pair", selected_adapters=["nope"])


def test_tampered_subfolder_file_loads_nothing(hub, three, tiny_base_dir):
    push_to_hub(three, "alice/t")
    path = "code/adapter_model.safetensors"
    data = bytearray(hub.storage.blobs[hub.storage.resolve("alice/t", "main").files[path].blob_key])
    data[-1] ^= 0xFF
    hub.storage.tamper("alice/t", path, bytes(data))
    other = fresh_model(tiny_base_dir)
    with pytest.raises(IntegrityError, match="code/adapter_model.safetensors"):
        load_pretrained_adapters(other, "alice/t")
    assert other.adapter_names == []


def test_index_pins_are_checked_and_offline_pulls_use_the_cache(hub, three, tiny_base_dir, monkeypatch):
    from huggingface_hub import CommitOperationAdd, HfApi

    from tests.hub.conftest import go_offline, go_online

    push_to_hub(three, "alice/pins")
    assert load_pretrained_adapters(fresh_model(tiny_base_dir), "alice/pins") == ["sql", "code", "math"]
    go_offline(monkeypatch)  # the verified snapshot is in the HF cache now
    assert load_pretrained_adapters(fresh_model(tiny_base_dir), "alice/pins") == ["sql", "code", "math"]
    go_online(monkeypatch)

    folder = hub.cache_dir / "models--alice--pins" / "snapshots"
    index = json.loads(next(folder.glob(f"*/{INDEX_NAME}")).read_text())
    index["files"]["math/adapter_config.json"] = "0" * 64  # the Hub's listing still matches the file
    HfApi().create_commit("alice/pins", operations=[CommitOperationAdd(INDEX_NAME, json.dumps(index).encode())],
                          commit_message="wrong pin")
    other = fresh_model(tiny_base_dir)
    with pytest.raises(IntegrityError, match=r"'math/adapter_config.json' has sha256 .* pinned 0{64}"):
        load_pretrained_adapters(other, "alice/pins")
    assert other.adapter_names == []
