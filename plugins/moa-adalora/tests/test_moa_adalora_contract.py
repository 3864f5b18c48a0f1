"""AdaLoRA passes moa's adapter-type contract; its factors, scale and config checks are PEFT's."""

from __future__ import annotations

import pytest
import torch

from moa.errors import AdapterConfigError
from moa.testing import AdapterTypeContract, require_plugin

moa_adalora = require_plugin("moa-adalora", "moa_adalora")
ADALORA_KWARGS = {"target_modules": ["q_proj", "v_proj", "down_proj"], "init_r": 4, "target_r": 2,
                  "lora_alpha": 8, "total_step": 10}


class TestAdaLoraContract(AdapterTypeContract):
    adapter_type = "adalora"
    config_kwargs = ADALORA_KWARGS
    bad_config_kwargs = (
        {"target_modules": []},
        {"target_modules": ["no_such_module"]},
        {"target_modules": None},
        {"total_step": None},
        {"total_step": 10, "tinit": 6, "tfinal": 4},
        {"init_r": 0},
        {"orth_reg_weight": -0.1},
        {"lora_dropout": 1.5},
        {"rank_pattern": {"model.layers.0.self_attn.q_proj.lora_E": [True, False]}},
        {"rank_pattern": {"model.layers.0.self_attn.q_proj": [True, True, False, False]}},
        {"use_dora": True},
        {"bias": "all"},
        {"fan_in_fan_out": True},
        {"init_lora_weights": "gaussian"},
    )


def test_low_rank_is_peft_svd_form():
    torch.manual_seed(0)
    config = moa_adalora.AdaLoraConfig(**ADALORA_KWARGS, init_lora_weights=False)
    layer = moa_adalora.AdaLoraLayer(config, "model.layers.0.self_attn.q_proj", 6, 5)
    a, b, scale = layer.low_rank()
    ranknum = torch.tensor([4.0]) + 1e-5  # PEFT's ranknum parameter (float32), plus 1e-5
    x = torch.randn(3, 6)
    expected = (x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T) * 8 / ranknum  # SVDLinear.forward
    torch.testing.assert_close(scale * (x @ a.T @ b.T), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.delta_weight(), layer.lora_B @ (layer.lora_A * layer.lora_E) * 8 / ranknum)
    assert tuple(layer.lora_A.shape) == (4, 6) and tuple(layer.lora_E.shape) == (4, 1)
    assert tuple(layer.lora_B.shape) == (5, 4)


def test_default_init_is_identity_with_small_singular_vectors():
    torch.manual_seed(0)
    layer = moa_adalora.AdaLoraLayer(moa_adalora.AdaLoraConfig(**ADALORA_KWARGS), "q_proj", 64, 32)
    assert bool((layer.lora_E == 0).all())
    assert 0.01 < float(layer.lora_A.detach().std()) < 0.03 and 0.01 < float(layer.lora_B.detach().std()) < 0.03


def test_product_is_cached_until_a_factor_changes_and_fresh_under_autograd():
    config = moa_adalora.AdaLoraConfig(**ADALORA_KWARGS, init_lora_weights=False)
    layer = moa_adalora.AdaLoraLayer(config, "q_proj", 6, 5)
    with torch.no_grad():
        first = layer.low_rank()[0]
        assert layer.low_rank()[0] is first
        layer.lora_E.mul_(2.0)
        second = layer.low_rank()[0]
    assert second is not first
    torch.testing.assert_close(second, layer.lora_A.detach() * layer.lora_E.detach())
    product = layer.low_rank()[0]  # grad enabled, trainable: part of this graph
    assert product.requires_grad and product.grad_fn is not None and product is not layer.low_rank()[0]


def test_rank_pattern_sets_the_module_rank_and_keeps_init_r_in_the_scale():
    mask = [True, False, True, False]
    config = moa_adalora.AdaLoraConfig(**ADALORA_KWARGS, rank_pattern={
        "model.layers.0.self_attn.q_proj.lora_E": mask,
        "model.layers.0.self_attn.v_proj.lora_E": [False] * 4})
    config.validate()
    pruned = moa_adalora.AdaLoraLayer(config, "model.layers.0.self_attn.q_proj", 6, 5)
    empty = moa_adalora.AdaLoraLayer(config, "model.layers.0.self_attn.v_proj", 6, 5)
    full = moa_adalora.AdaLoraLayer(config, "model.layers.1.self_attn.q_proj", 6, 5)
    assert (pruned.rank, empty.rank, full.rank) == (2, 0, 4)
    assert pruned.scale == empty.scale == full.scale == pytest.approx(8 / 4.00001)
    assert tuple(empty.low_rank()[0].shape) == (0, 6) and tuple(empty.low_rank()[1].shape) == (5, 0)


def test_saving_during_allocation_keeps_only_the_kept_rows():
    config = moa_adalora.AdaLoraConfig(**ADALORA_KWARGS, init_lora_weights=False)
    layer = moa_adalora.AdaLoraLayer(config, "q_proj", 6, 5)
    layer.rank_mask = [False, True, True, False]
    saved = layer.peft_state_dict()
    torch.testing.assert_close(saved["lora_A"], layer.lora_A.detach()[1:3])
    torch.testing.assert_close(saved["lora_E"], layer.lora_E.detach()[1:3])
    torch.testing.assert_close(saved["lora_B"], layer.lora_B.detach()[:, 1:3])


def test_config_errors_say_what_to_do():
    with pytest.raises(AdapterConfigError, match="total_step"):
        moa_adalora.AdaLoraConfig(target_modules=["q_proj"]).validate()
    with pytest.raises(AdapterConfigError, match="init_r=4 booleans"):
        moa_adalora.AdaLoraConfig(**ADALORA_KWARGS, rank_pattern={"q_proj.lora_E": [1, 0, 1, 0]}).validate()
    data = moa_adalora.AdaLoraConfig(**ADALORA_KWARGS).to_dict()
    assert data["peft_type"] == "ADALORA" and data["inference_mode"] is True and data["rank_pattern"] is None
