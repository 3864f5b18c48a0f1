"""Configs and folders the plugin cannot honour are refused with a MoaError, and nothing changes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moa.errors import AdapterConfigError, AdapterShapeError, MoaError
from moa.testing import load_tiny_base, make_tiny_model, require_plugin, save_tiny_base

moa_prompt_tuning = require_plugin("moa-prompt-tuning", "moa_prompt_tuning")
peft = pytest.importorskip("peft")

PromptTuningConfig = moa_prompt_tuning.PromptTuningConfig
PrefixTuningConfig = moa_prompt_tuning.PrefixTuningConfig


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (lambda: PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True), AdapterConfigError,
         "prefix_projection"),
        (lambda: PrefixTuningConfig(num_virtual_tokens=4, init_weights="ones"), AdapterConfigError, "init_weights"),
        (lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="BOGUS"), AdapterConfigError,
         "prompt_tuning_init"),
        (lambda: PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT"), AdapterConfigError,
         "prompt_tuning_init_text"),
        (lambda: PromptTuningConfig(num_virtual_tokens=4, tokenizer_kwargs={"use_fast": True}), AdapterConfigError,
         "tokenizer_kwargs"),
        (lambda: PromptTuningConfig(num_virtual_tokens=4, num_transformer_submodules=2), AdapterConfigError,
         "num_transformer_submodules"),
        (lambda: PromptTuningConfig(num_virtual_tokens=0), AdapterConfigError, "num_virtual_tokens"),
        (lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"), AdapterConfigError,
         "CAUSAL_LM"),
        (lambda: PromptTuningConfig(num_virtual_tokens=4, token_dim=32), AdapterShapeError, "token_dim"),
        (lambda: PrefixTuningConfig(num_virtual_tokens=4, num_layers=12), AdapterShapeError, "num_layers"),
        (lambda: PromptTuningConfig(num_virtual_tokens=256), AdapterShapeError, "context"),
    ],
)
def test_bad_configs_are_refused_and_the_model_is_unchanged(moa_tiny_model, moa_plugin_manager, config, error,
                                                            message):
    with pytest.raises(error, match=message):
        moa_tiny_model.add_adapter("bad", config())
    assert moa_tiny_model.adapter_names == [] and len(moa_tiny_model.input_adapters) == 0


def test_text_init_without_a_tokenizer_is_refused(moa_tiny_model, moa_plugin_manager):
    moa_tiny_model.tokenizer = None
    with pytest.raises(AdapterConfigError, match="needs a tokenizer"):
        moa_tiny_model.add_adapter("t", PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT",
                                                           prompt_tuning_init_text="hello"))
    assert moa_tiny_model.adapter_names == []


def test_peft_prefix_projection_folder_is_refused(moa_tiny_base_dir, moa_plugin_manager, tmp_path):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True)
    peft.get_peft_model(load_tiny_base(moa_tiny_base_dir), config).save_pretrained(tmp_path / "proj")
    model = make_tiny_model(moa_tiny_base_dir)
    with pytest.raises(AdapterConfigError, match="prefix_projection") as info:
        model.load_adapter(tmp_path / "proj", adapter_name="p")
    assert "adapter_config.json" in str(info.value) and model.adapter_names == []


def test_folder_made_for_another_base_is_refused(moa_tiny_base_dir, moa_plugin_manager, tmp_path):
    wide = save_tiny_base(tmp_path / "wide", hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    for config in (peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
                   peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)):
        peft.get_peft_model(load_tiny_base(wide), config).save_pretrained(tmp_path / config.peft_type)
        model = make_tiny_model(moa_tiny_base_dir)
        with pytest.raises(AdapterShapeError, match="another base"):
            model.load_adapter(tmp_path / config.peft_type, adapter_name="w")
        assert model.adapter_names == []


def test_wrong_tensor_shape_in_the_weights_file_is_refused(moa_tiny_base_dir, moa_plugin_manager, tmp_path):
    peft.get_peft_model(load_tiny_base(moa_tiny_base_dir),
                        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({"prompt_embeddings": torch.zeros(4, 64)}, weights)  # the config says 3 virtual tokens
    model = make_tiny_model(moa_tiny_base_dir)
    with pytest.raises(AdapterShapeError, match="adapter_model.safetensors") as info:
        model.load_adapter(tmp_path, adapter_name="x")
    assert "(4, 64)" in str(info.value) and model.adapter_names == []
    save_file({"prompt_embeddings": torch.zeros(3, 64), "extra": torch.zeros(1)}, weights)
    with pytest.raises(MoaError, match="extra"):
        model.load_adapter(tmp_path, adapter_name="x")
    assert set(load_file(weights)) == {"prompt_embeddings", "extra"}


def test_missing_plugin_names_the_peft_type(moa_tiny_base_dir, tmp_path, monkeypatch):
    from moa.errors import UnknownPluginError
    from moa.testing import fresh_plugin_manager

    peft.get_peft_model(load_tiny_base(moa_tiny_base_dir),
                        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(tmp_path)
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", "prompt_tuning")
    with fresh_plugin_manager():
        model = make_tiny_model(moa_tiny_base_dir)
        with pytest.raises(UnknownPluginError, match="PROMPT_TUNING"):
            model.load_adapter(tmp_path, adapter_name="x")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
