"""Choosing the adapter type of an adapter folder: ``accepts(config)`` first, then ``peft_type``.

This is how a plugin claims a variant of a PEFT type another type owns (DoRA: ``"LORA"`` with
``use_dora: true``) without a ``peft_type`` conflict.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch

import moa
from moa.adapters.lora import LoraConfig, LoraLayer
from moa.errors import PluginConflictError, PluginError, UnknownPluginError
from moa.hookspecs import hookimpl
from moa.plugin import (
    MoaPluginManager,
    MoaPluginWarning,
    adapter_type_for_config,
    get_plugin_manager,
    reset_plugin_manager,
)
from moa.plugin.records import AdapterTypeSpec


@dataclasses.dataclass
class HalfLoraConfig(LoraConfig):
    """A LoRA variant (half the scale) saved as a PEFT LORA folder with ``"half": true``."""

    adapter_type: ClassVar[str] = "half_lora"
    half: bool = True

    @classmethod
    def accepts(cls, config: Mapping[str, Any]) -> bool:
        return str(config.get("peft_type", "")).upper() == "LORA" and config.get("half") is True

    def scale_for(self, module_name: str) -> float:
        return super().scale_for(module_name) / 2


class HalfLoraPlugin:
    @hookimpl
    def moa_adapter_types(self):
        return [AdapterTypeSpec(name="half_lora", config_class=HalfLoraConfig, layer_class=LoraLayer)]


class GreedyConfig(HalfLoraConfig):
    """Accepts the same configs as HalfLoraConfig: a conflict."""


class GreedyPlugin:
    @hookimpl
    def moa_adapter_types(self):
        return [AdapterTypeSpec(name="greedy", config_class=GreedyConfig, layer_class=LoraLayer)]


class BrokenConfig(LoraConfig):
    @classmethod
    def accepts(cls, config: Mapping[str, Any]) -> bool:
        raise RuntimeError("boom")


class BrokenPlugin:
    @hookimpl
    def moa_adapter_types(self):
        return [AdapterTypeSpec(name="broken", config_class=BrokenConfig, layer_class=LoraLayer)]


def manager(*plugins: object, strict: bool = False) -> MoaPluginManager:
    pm = MoaPluginManager(load_entry_points=False, strict=strict)
    for plugin in plugins:
        pm.register(plugin, name=type(plugin).__name__)
    return pm


def test_without_accepting_types_the_peft_type_decides():
    pm = manager()
    assert pm.adapter_type_for_config({"peft_type": "LORA"}).name == "lora"
    assert pm.adapter_type_for_config({"peft_type": "lora", "use_dora": True}).name == "lora"
    with pytest.raises(UnknownPluginError, match="No adapter type reads peft_type 'VERA'"):
        pm.adapter_type_for_config({"peft_type": "VERA"})
    with pytest.raises(UnknownPluginError):
        pm.adapter_type_for_config({})


def test_a_type_that_accepts_wins_over_the_peft_type_owner():
    pm = manager(HalfLoraPlugin())
    assert pm.adapter_type_for_config({"peft_type": "LORA", "half": True}).name == "half_lora"
    assert pm.adapter_type_for_config({"peft_type": "LORA", "half": False}).name == "lora"
    assert pm.adapter_type_for_config({"peft_type": "LORA"}).name == "lora"
    assert pm.adapter_type_for_peft_type("LORA").name == "lora"  # unchanged


def test_two_types_accepting_one_config_is_a_conflict_naming_both():
    pm = manager(HalfLoraPlugin(), GreedyPlugin())
    with pytest.raises(PluginConflictError, match="'greedy', 'half_lora'|'half_lora', 'greedy'"):
        pm.adapter_type_for_config({"peft_type": "LORA", "half": True})
    assert pm.adapter_type_for_config({"peft_type": "LORA"}).name == "lora"


def test_an_accepts_that_raises_is_skipped_with_a_warning_or_fails_when_strict():
    pm = manager(BrokenPlugin(), HalfLoraPlugin())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pm.adapter_type_for_config({"peft_type": "LORA", "half": True}).name == "half_lora"
    messages = [str(w.message) for w in caught if issubclass(w.category, MoaPluginWarning)]
    assert messages and "BrokenConfig.accepts() raised RuntimeError: boom" in messages[0]
    strict = manager(BrokenPlugin(), strict=True)
    with pytest.raises(PluginError, match="boom"):
        strict.adapter_type_for_config({"peft_type": "LORA"})


def test_load_adapter_uses_the_accepting_type(tiny_model, tiny_base_dir, tmp_path, input_ids):
    reset_plugin_manager()
    get_plugin_manager().register(HalfLoraPlugin(), name="half")
    assert adapter_type_for_config({"peft_type": "LORA", "half": True}).name == "half_lora"
    torch.manual_seed(0)
    tiny_model.add_adapter("h", HalfLoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    tiny_model.save_adapter("h", tmp_path / "h")
    with torch.no_grad():
        expected = tiny_model(input_ids, adapter_names=["h"] * 4).logits
    other = moa.MixtureModel(type(tiny_model.base_model).from_pretrained(tiny_base_dir).eval())
    other.load_adapter(tmp_path / "h", adapter_name="h")
    assert type(other.peft_config["h"]) is HalfLoraConfig
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids, adapter_names=["h"] * 4).logits, expected)
