"""DoRA passes moa's adapter-type contract; its weight norm and magnitude behave as in PEFT."""

from __future__ import annotations

import torch

from moa.testing import AdapterTypeContract, require_plugin

moa_dora = require_plugin("moa-dora", "moa_dora")
DORA_KWARGS = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


class TestDoraContract(AdapterTypeContract):
    adapter_type = "dora"
    config_kwargs = DORA_KWARGS
    bad_config_kwargs = (
        {"target_modules": []},
        {"target_modules": ["no_such_module"]},
        {"use_dora": False},
        {"r": 0},
        {"bias": "all"},
        {"lora_dropout": 1.5},
    )


def test_delta_is_peft_formula_with_detached_norm():
    torch.manual_seed(0)
    config = moa_dora.DoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    base = torch.nn.Linear(6, 5, bias=True)
    layer = moa_dora.DoraLayer(config, "model.layers.0.self_attn.q_proj", 6, 5)
    x = torch.randn(3, 6)
    layer.delta(x, base)  # first call: magnitude = ||W + s BA||
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(5))
    weight = base.weight + layer.scale * layer.lora_B.weight @ layer.lora_A.weight
    norm = torch.linalg.norm(weight, dim=1).detach()
    mag = layer.lora_magnitude_vector / norm
    expected = (mag - 1) * (x @ base.weight.T) + mag * layer.scale * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer.delta(x, base), expected)
    # the whole adapted layer is m * (W + sBA) / ||W + sBA|| applied to x, plus the bias
    torch.testing.assert_close(base(x) + layer.delta(x, base), x @ (mag[:, None] * weight).T + base.bias)


def test_weight_norm_is_cached_until_the_factors_change():
    torch.manual_seed(1)
    config = moa_dora.DoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    base = torch.nn.Linear(6, 5)
    layer = moa_dora.DoraLayer(config, "q_proj", 6, 5)
    first = layer.weight_norm(base)
    assert layer.weight_norm(base) is first
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.delta(torch.randn(2, 6), base).sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_B.weight.grad is not None
    optimizer.step()
    second = layer.weight_norm(base)
    assert second is not first and not torch.allclose(second, first)
    assert not second.requires_grad


def test_new_adapter_magnitude_is_set_at_install_and_saves_at_once(moa_tiny_model, tmp_path):
    from safetensors.torch import load_file

    moa_tiny_model.add_adapter("d", moa_dora.DoraConfig(**DORA_KWARGS))
    moa_tiny_model.save_adapter("d", tmp_path / "d")  # no forward needed
    saved = load_file(tmp_path / "d" / "adapter_model.safetensors")
    layers = moa_tiny_model.adapter_layers("d")
    name, layer = next(iter(sorted(layers.items())))
    base_weight = moa_tiny_model.base_model.get_submodule(name).base_layer.weight
    expected = torch.linalg.norm(base_weight.float(), dim=1)  # B = 0: m = ||W|| per row
    key = f"base_model.model.{name}.lora_magnitude_vector"
    torch.testing.assert_close(saved[key], expected, rtol=1e-6, atol=1e-6)


def test_accepts_only_lora_configs_with_use_dora():
    accepts = moa_dora.DoraConfig.accepts
    assert accepts({"peft_type": "LORA", "use_dora": True})
    assert accepts({"peft_type": "lora", "use_dora": True})
    assert not accepts({"peft_type": "LORA", "use_dora": False})
    assert not accepts({"peft_type": "LORA"})
    assert not accepts({"peft_type": "IA3", "use_dora": True})
    assert not accepts({"use_dora": True})
