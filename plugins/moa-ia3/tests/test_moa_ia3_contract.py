"""The IA3 adapter type passes moa's adapter-type contract, plus IA3-specific behaviour."""

from __future__ import annotations

import pytest
import torch

from moa.errors import AdapterConfigError
from moa.testing import AdapterTypeContract, require_plugin

moa_ia3 = require_plugin("moa-ia3", "moa_ia3")
IA3_KWARGS = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}


class TestIA3Contract(AdapterTypeContract):
    adapter_type = "ia3"
    config_kwargs = IA3_KWARGS
    bad_config_kwargs = (
        {"target_modules": []},
        {"target_modules": ["no_such_module"], "feedforward_modules": []},
        {"feedforward_modules": ["up_proj"]},
        {"feedforward_modules": "down_proj("},
        {"fan_in_fan_out": True},
        {"exclude_modules": ["k_proj"]},
        {"modules_to_save": ["lm_head"]},
        {"init_ia3_weights": "yes"},
    )


def test_vectors_have_peft_shapes_and_start_at_one(moa_tiny_model):
    moa_tiny_model.add_adapter("a", moa_ia3.IA3Config(**IA3_KWARGS))
    layers = moa_tiny_model.adapter_layers("a")
    assert sorted({name.rsplit(".", 1)[-1] for name in layers}) == ["down_proj", "k_proj", "v_proj"]
    down = layers["model.layers.0.mlp.down_proj"]
    k_proj = layers["model.layers.0.self_attn.k_proj"]
    assert down.is_feedforward and not k_proj.is_feedforward
    assert tuple(down.ia3_l.shape) == (1, 128) and tuple(k_proj.ia3_l.shape) == (32, 1)
    assert all(bool((layer.ia3_l == 1).all()) for layer in layers.values())
    assert all(layer.low_rank() is None for layer in layers.values())


def test_delta_scales_output_or_input_exactly():
    config = moa_ia3.IA3Config(**IA3_KWARGS)
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=True)
    x = torch.randn(3, 6)
    out_layer = moa_ia3.IA3Layer(config, "model.layers.0.self_attn.v_proj", 6, 5)
    in_layer = moa_ia3.IA3Layer(config, "model.layers.0.mlp.down_proj", 6, 5)
    with torch.no_grad():
        out_layer.ia3_l.copy_(torch.randn(5, 1))
        in_layer.ia3_l.copy_(torch.randn(1, 6))
        torch.testing.assert_close(base(x) + out_layer.delta(x, base), base(x) * out_layer.ia3_l.T)
        torch.testing.assert_close(base(x) + in_layer.delta(x, base), base(x * in_layer.ia3_l))


def test_feedforward_default_and_regex_follow_peft():
    default = moa_ia3.IA3Config(target_modules=["k_proj", "down_proj"])
    assert default.is_feedforward("model.layers.3.mlp.down_proj")
    assert not default.is_feedforward("model.layers.3.self_attn.k_proj")
    assert default.to_dict()["feedforward_modules"] == ["down_proj"]
    regex = moa_ia3.IA3Config(target_modules=r".*\.(k_proj|up_proj)", feedforward_modules=r".*\.up_proj")
    regex.validate()
    assert regex.is_feedforward("model.layers.0.mlp.up_proj")
    assert not regex.is_feedforward("model.layers.0.self_attn.k_proj")


def test_bad_config_errors_say_what_to_do():
    with pytest.raises(AdapterConfigError, match="not in target_modules"):
        moa_ia3.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]).validate()
    with pytest.raises(AdapterConfigError, match="fan_in_fan_out"):
        moa_ia3.IA3Config(fan_in_fan_out=True).validate()
