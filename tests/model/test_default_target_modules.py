"""``LoraConfig(target_modules=None)``: PEFT's default target modules for the base's architecture.

Checked against the real ``peft`` package on the tiny Llama base: ``peft.get_peft_model(base,
peft.LoraConfig())`` and ``model.add_adapter(name, moa.LoraConfig())`` adapt the same modules,
and the saved ``adapter_config.json`` records the resolved module suffixes, as PEFT's does.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import moa
from moa.adapters.base import AdapterConfig
from moa.adapters.peft_format import CONFIG_NAME
from moa.errors import AdapterConfigError, TargetModuleError
from moa.model.targets import peft_default_target_modules, resolve_target_modules
from moa.testing.fixtures import load_tiny_base, save_tiny_base

peft = pytest.importorskip("peft")
PEFT_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def peft_lora_modules(peft_model) -> set[str]:
    """Names (in the base) of the modules PEFT put a LoRA layer on."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX) for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


def test_none_picks_the_same_modules_as_peft(base_dir, tmp_path):
    peft_model = peft.get_peft_model(load_tiny_base(base_dir), peft.LoraConfig())
    model = moa.MixtureModel(load_tiny_base(base_dir))
    model.add_adapter("default_targets", moa.LoraConfig())
    ours = set(model.adapter_layers("default_targets"))
    assert ours == peft_lora_modules(peft_model)
    assert {name.rsplit(".", 1)[-1] for name in ours} == {"q_proj", "v_proj"}  # PEFT's default for llama
    assert len(ours) == 2 * model.config.num_hidden_layers

    model.save_adapter("default_targets", tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    peft_saved = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    assert saved["target_modules"] == ["q_proj", "v_proj"] == sorted(peft_saved["target_modules"])
    reloaded = peft.PeftModel.from_pretrained(load_tiny_base(base_dir), tmp_path / "ours")
    assert peft_lora_modules(reloaded) == ours


def test_resolve_target_modules_reads_the_model_type(base_dir):
    base = load_tiny_base(base_dir)
    assert peft_default_target_modules(base) == ["q_proj", "v_proj"]
    assert resolve_target_modules(base, None) == resolve_target_modules(base, ["q_proj", "v_proj"])


@pytest.mark.parametrize("config", [SimpleNamespace(model_type="moa-unknown-arch"), None])
def test_architecture_without_a_peft_default_asks_for_target_modules(config):
    module = nn.Module()
    module.proj = nn.Linear(4, 4)
    if config is not None:
        module.config = config
    model_type = getattr(config, "model_type", None)
    with pytest.raises(TargetModuleError) as info:
        resolve_target_modules(module, None)
    message = str(info.value)
    assert f"model_type={model_type!r}" in message and "Pass target_modules explicitly" in message
    assert "llama" in message and "proj" in message  # PEFT's known types, and this model's linear names


def test_validate_accepts_none_for_lora_only():
    moa.LoraConfig().validate()
    moa.LoraConfig(target_modules=None).validate()
    with pytest.raises(AdapterConfigError, match="needs target_modules"):
        moa.LoraConfig(target_modules=[]).validate()
    with pytest.raises(AdapterConfigError, match="needs target_modules"):
        AdapterConfig(target_modules=None).validate()  # types without a PEFT default still need them


def test_explicit_targets_are_unchanged(base_dir):
    model = moa.MixtureModel(load_tiny_base(base_dir))
    torch.manual_seed(0)
    model.add_adapter("k", moa.LoraConfig(target_modules=["k_proj"]))
    assert {name.rsplit(".", 1)[-1] for name in model.adapter_layers("k")} == {"k_proj"}
