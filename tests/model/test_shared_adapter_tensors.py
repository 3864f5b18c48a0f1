"""Adapter-level tensors: an adapter type saves and reads tensors that belong to no module.

A documentation-sized type, ``scaled_shift``: each module adds ``scale * shift`` to its output,
with a per-module ``shift [H_out]`` and one ``scale [1]`` for the whole adapter, saved once as
``base_model.shift_scale`` (``AdapterLayer.shared_peft_keys``), the way VeRA saves its shared
projections. A file without it (the type's "regenerate" case) gets the default scale.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import moa
from moa.errors import AdapterFormatError
from moa.hookspecs import hookimpl
from moa.plugin.records import AdapterTypeSpec
from moa.testing import fresh_plugin_manager, load_tiny_base, random_input_ids

SCALE_KEY = "base_model.shift_scale"


@dataclasses.dataclass
class ScaledShiftConfig(moa.AdapterConfig):
    adapter_type: ClassVar[str] = "scaled_shift"
    peft_type: ClassVar[str] = "SCALED_SHIFT"


class ScaledShiftLayer(moa.AdapterLayer):
    peft_suffixes: ClassVar[tuple[str, ...]] = ("shift",)
    shared_peft_keys: ClassVar[tuple[str, ...]] = (SCALE_KEY,)

    def __init__(self, config, module_name, in_features, out_features):
        super().__init__(config, module_name, in_features, out_features)
        self.shift = nn.Parameter(torch.zeros(out_features))
        self.register_buffer("scale", torch.ones(1), persistent=False)

    def delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return (self.scale * self.shift).expand(x.shape[0], -1)

    @classmethod
    def shared_peft_state_dict(cls, config, layers: Mapping[str, moa.AdapterLayer]) -> dict[str, torch.Tensor]:
        return {SCALE_KEY: next(iter(layers.values())).scale}

    @classmethod
    def load_shared_peft_state_dict(cls, config, layers, tensors) -> None:
        scale = tensors.get(SCALE_KEY, torch.ones(1))  # missing: the default, as a type may regenerate it
        for layer in layers.values():
            layer.scale.copy_(scale)


class LeakyShiftLayer(ScaledShiftLayer):
    """Saves a tensor it does not declare, which moa could not read back."""

    @classmethod
    def shared_peft_state_dict(cls, config, layers):
        return {"base_model.undeclared": torch.ones(1)}


@hookimpl
def moa_adapter_types() -> list[AdapterTypeSpec]:
    return [AdapterTypeSpec(name="scaled_shift", config_class=ScaledShiftConfig, layer_class=ScaledShiftLayer,
                            peft_type="SCALED_SHIFT")]


@pytest.fixture
def plugin():
    with fresh_plugin_manager([sys.modules[__name__]]):
        yield


def add_random(model: moa.MixtureModel, name: str, scale: float) -> None:
    model.add_adapter(name, ScaledShiftConfig(target_modules=["o_proj", "down_proj"]))
    with torch.no_grad():
        for layer in model.adapter_layers(name).values():
            layer.shift.normal_()
            layer.scale.fill_(scale)


def logits(model: moa.MixtureModel, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, adapter_names=[name] * ids.shape[0]).logits


def test_shared_tensor_is_saved_once_and_read_back(plugin, tiny_model, tiny_base_dir, tmp_path):
    add_random(tiny_model, "s", scale=2.5)
    ids = random_input_ids(2, 5)
    before = logits(tiny_model, ids, "s")
    tiny_model.save_adapter("s", tmp_path / "s")
    tensors = load_file(tmp_path / "s" / "adapter_model.safetensors")
    assert [key for key in tensors if not key.endswith(".shift")] == [SCALE_KEY]
    assert float(tensors[SCALE_KEY]) == 2.5
    assert len(tensors) == 1 + 2 * 4  # one scale, a shift per module (o_proj and down_proj of 4 layers)

    other = moa.MixtureModel(load_tiny_base(tiny_base_dir))
    other.load_adapter(tmp_path / "s", adapter_name="s")
    assert all(float(layer.scale) == 2.5 for layer in other.adapter_layers("s").values())
    torch.testing.assert_close(logits(other, ids, "s"), before, rtol=0, atol=1e-6)


def test_a_missing_shared_tensor_reaches_the_type_which_may_rebuild_it(plugin, tiny_model, tiny_base_dir, tmp_path):
    add_random(tiny_model, "s", scale=3.0)
    tiny_model.save_adapter("s", tmp_path / "s")
    weights = tmp_path / "s" / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors[SCALE_KEY]
    save_file(tensors, weights)
    other = moa.MixtureModel(load_tiny_base(tiny_base_dir))
    other.load_adapter(tmp_path / "s", adapter_name="s")
    assert all(float(layer.scale) == 1.0 for layer in other.adapter_layers("s").values())


def test_undeclared_adapter_level_tensors_are_refused(plugin, tiny_model, tmp_path):
    # a LoRA file with an extra tensor that belongs to no module: LoRA declares none, so it is refused
    tiny_model.add_adapter("l", moa.LoraConfig(r=2, target_modules=["q_proj"]))
    tiny_model.save_adapter("l", tmp_path / "l")
    weights = tmp_path / "l" / "adapter_model.safetensors"
    save_file({**load_file(weights), SCALE_KEY: torch.ones(1)}, weights)
    with pytest.raises(AdapterFormatError, match="shift_scale"):
        tiny_model.load_adapter(tmp_path / "l", adapter_name="l2")
    assert tiny_model.adapter_names == ["l"]

    # a type saving a tensor it does not declare could not read it back: refused when saving
    config = ScaledShiftConfig(target_modules=["o_proj"])
    layers = {name: LeakyShiftLayer(config, name, *layer_features(tiny_model, name))
              for name in ("model.layers.0.self_attn.o_proj",)}
    tiny_model.install_adapter("leaky", config, layers)
    with pytest.raises(AdapterFormatError, match="shared_peft_keys"):
        tiny_model.save_adapter("leaky", tmp_path / "leaky")
    assert not (tmp_path / "leaky").exists()


def layer_features(model: moa.MixtureModel, module_name: str) -> tuple[int, int]:
    base_layer = model.bank.base_layer(module_name)
    return base_layer.in_features, base_layer.out_features
