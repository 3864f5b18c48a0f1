"""Bad adapter files: each a specific MoaError, and nothing in the model changes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import moa
from moa.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_safetensors
from moa.errors import (
    AdapterConfigError,
    AdapterFormatError,
    AdapterShapeError,
    BaseModelMismatchError,
    TargetModuleError,
)
from moa.testing.fixtures import make_tiny_base


@pytest.fixture
def saved(tiny_model, tmp_path):
    """The tiny model with adapter 'good' loaded, and a saved copy of another adapter."""
    torch.manual_seed(0)
    tiny_model.add_adapter("good", moa.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    tiny_model.add_adapter("src", moa.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tiny_model.save_adapter("src", tmp_path / "src")
    tiny_model.delete_adapter("src")
    return tiny_model, tmp_path / "src"


def snapshot(model, input_ids):
    with torch.no_grad():
        return model.adapter_names, model(input_ids, adapter_names=["good"] * 4).logits


def edit_tensors(folder, edit):
    tensors, metadata = read_safetensors(folder / WEIGHTS_NAME)
    edit(tensors, metadata)
    save_file(tensors, folder / WEIGHTS_NAME, metadata)


def truncate(folder):
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def garbage(folder):
    (folder / WEIGHTS_NAME).write_bytes(b"\x00" * 64)


def wrong_shape(folder):
    def edit(t, _):
        key = next(k for k in t if k.endswith("q_proj.lora_B.weight"))
        t[key] = torch.zeros(t[key].shape[0] + 3, t[key].shape[1])
        _.pop("moa.base_fingerprint")  # as a PEFT-made file would have it: shapes are the check

    edit_tensors(folder, edit)


def unknown_module(folder):
    def edit(t, _):
        t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = torch.zeros(8, 64)
        t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"] = torch.zeros(64, 8)

    edit_tensors(folder, edit)


def other_base(folder):
    edit_tensors(folder, lambda _, m: m.__setitem__("moa.base_fingerprint", "0123456789abcdef"))


def pickle_only(folder):
    (folder / WEIGHTS_NAME).unlink()
    (folder / "adapter_model.bin").write_bytes(b"not loaded")


def dora(folder):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["use_dora"] = True
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def bad_json(folder):
    (folder / CONFIG_NAME).write_text("{not json")


def rank_too_big(folder):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["r"] = 300
    (folder / CONFIG_NAME).write_text(json.dumps(config))

    def edit(t, _):
        for key in list(t):
            t[key] = torch.zeros(300, t[key].shape[1]) if "lora_A" in key else torch.zeros(t[key].shape[0], 300)

    edit_tensors(folder, edit)


@pytest.mark.parametrize(
    ("corrupt", "error", "match"),
    [
        (truncate, AdapterFormatError, "truncated or corrupt"),
        (garbage, AdapterFormatError, "not a readable safetensors"),
        (wrong_shape, AdapterShapeError, r"has shape \(67, 8\) but this base needs \(64, 8\)"),
        (unknown_module, TargetModuleError, "qkv_proj"),
        (other_base, BaseModelMismatchError, "0123456789abcdef"),
        (pickle_only, AdapterFormatError, "pickle"),
        (dora, AdapterConfigError, "moa-dora"),
        (bad_json, AdapterFormatError, "not valid JSON"),
        (rank_too_big, AdapterShapeError, "max_rank=256"),
    ],
)
def test_bad_adapter_folder_raises_and_changes_nothing(saved, input_ids, corrupt, error, match, monkeypatch):
    from moa.plugin import reset_plugin_manager

    # without the moa-dora plugin, the built-in LoRA type must refuse use_dora and say where DoRA is
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", "dora")
    reset_plugin_manager()
    monkeypatch.setattr("moa.plugin._manager", None, raising=False)
    model, folder = saved
    names, before = snapshot(model, input_ids)
    corrupt(folder)
    with pytest.raises(error, match=match):
        model.load_adapter(folder, adapter_name="new")
    after_names, after = snapshot(model, input_ids)
    assert after_names == names == ["good"]
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # the adapter still loads once the folder is fixed: the failure left no half state
    assert "new" not in model.peft_config


def test_intact_folder_loads_after_failures(saved, tmp_path, input_ids):
    model, folder = saved
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    truncate(broken)
    with pytest.raises(AdapterFormatError):
        model.load_adapter(broken, adapter_name="src")
    model.load_adapter(folder, adapter_name="src")
    assert model.adapter_names == ["good", "src"]


def test_adapter_of_another_base_is_refused_by_fingerprint(saved, tmp_path):
    _, folder = saved
    # another shape (3 layers, not 4) on purpose: a base the adapter was not trained on
    other = moa.MixtureModel(make_tiny_base(seed=0, num_hidden_layers=3))
    with pytest.raises(BaseModelMismatchError, match="Load it on the base it was trained on"):
        other.load_adapter(folder, adapter_name="src")
    assert other.adapter_names == []


def test_missing_folder_and_not_a_repo_id(tiny_model, tmp_path):
    with pytest.raises(AdapterFormatError, match="neither a folder nor a Hub repo id"):
        tiny_model.load_adapter(tmp_path / "nope" / "deeper", adapter_name="x")


def test_save_is_atomic_when_writing_fails(saved, tmp_path, monkeypatch):
    model, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    model.load_adapter(folder, adapter_name="src")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moa.adapters.peft_format.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter("good", folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".src.tmp-")]


def test_loaded_base_param_names_follow_peft_wrapping(tiny_base_dir):
    model = moa.MixtureModel(LlamaForCausalLM.from_pretrained(tiny_base_dir))
    model.add_adapter("a", moa.LoraConfig(target_modules=["q_proj"]))
    names = [n for n, _ in model.named_parameters()]
    assert "base_model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert "base_model.model.layers.0.self_attn.q_proj.adapters.a.lora_A.weight" in names
