"""Folding adapters into the base: exact on fp32, measured on NF4, dense export that transformers loads."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.errors import UnknownAdapterError
from moa.merge import MergeError, merge_and_unload, merge_into_base, save_merged


def add(model, name, seed, r=4, alpha=8, shrink=1.0, targets="all-linear"):
    """A random adapter; ``shrink`` scales B so the adapter's effect is realistic."""
    torch.manual_seed(seed)
    model.add_adapter(name, moa.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for layer in model.adapter_layers(name).values():
            layer.lora_B.weight.mul_(shrink)


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits.float()


def rel(x, y):
    return float((x - y).norm() / y.norm())


def test_merge_and_unload_fp32_returns_the_plain_model_with_equal_logits(tiny_model, input_ids):
    from transformers import LlamaForCausalLM

    add(tiny_model, "a", 1)
    add(tiny_model, "b", 2, targets=["q_proj", "v_proj"])
    expected = logits(tiny_model, input_ids)  # the active adapter: "a"
    plain = merge_and_unload(tiny_model, progress=False)
    assert type(plain) is LlamaForCausalLM
    assert not any(type(m).__name__ == "MixtureLinear" for m in plain.modules())
    assert not plain._forward_pre_hooks  # moa's routing hook is gone
    assert rel(logits(plain, input_ids), logits(plain, input_ids)) == 0.0
    assert torch.allclose(logits(plain, input_ids), expected, atol=1e-5, rtol=0)


def test_merge_and_unload_a_weighted_mixture(tiny_model, input_ids):
    add(tiny_model, "a", 1)
    add(tiny_model, "b", 2, targets=["q_proj", "v_proj", "down_proj"])
    mixture = {"a": 0.7, "b": 0.4}
    expected = logits(tiny_model, input_ids, adapter_weights=mixture)
    plain, report = merge_and_unload(tiny_model, mixture, progress=False, return_report=True)
    assert torch.allclose(logits(plain, input_ids), expected, atol=1e-5, rtol=0)
    assert report.mixture == mixture and report.quantization is None and report.max_merge_error < 1e-6


def test_merge_into_base_in_place_keeps_the_model_usable(tiny_model, input_ids):
    add(tiny_model, "a", 1)
    add(tiny_model, "b", 2, targets=["q_proj", "v_proj"])
    both = logits(tiny_model, input_ids, adapter_weights={"a": 1.0, "b": 1.0})
    only_a = logits(tiny_model, input_ids, adapter_names=["a"] * 4)
    report = merge_into_base(tiny_model, "a", sample_input_ids=input_ids, progress=False)
    assert tiny_model.adapter_names == ["b"] and "a" not in tiny_model.active_adapters
    assert report.output_error < 1e-5 and report.max_merge_error < 1e-6 and report.mean_adapter_effect > 0.1
    assert len(report.layers) == 4 * 7 and report.mean_requant_error == 0.0  # all-linear: 4 layers x 7 projections
    with tiny_model.disable_adapters():
        assert torch.allclose(logits(tiny_model, input_ids), only_a, atol=1e-5, rtol=0)
    assert torch.allclose(logits(tiny_model, input_ids, adapter_names=["b"] * 4), both, atol=1e-5, rtol=0)


def test_keep_adapters_keeps_them_in_the_bank_but_inactive(tiny_model, input_ids):
    add(tiny_model, "a", 1)
    merge_into_base(tiny_model, ["a"], keep_adapters=True, progress=False)
    assert tiny_model.adapter_names == ["a"] and tiny_model.active_adapters == []


def test_bf16_dense_base_merges_to_bf16_rounding(tiny_base_dir, input_ids):
    from transformers import LlamaForCausalLM

    model = moa.MixtureModel(LlamaForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.bfloat16).eval())
    add(model, "a", 1)
    exact = moa.MixtureModel(LlamaForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.bfloat16).float().eval())
    add(exact, "a", 1)  # the same bf16 weights and adapter, computed in fp32
    expected = logits(exact, input_ids)
    bf16_noise = rel(logits(model, input_ids), expected)  # what computing in bf16 costs unmerged
    report = merge_into_base(model, progress=False)
    with model.disable_adapters():
        merged = logits(model, input_ids)
    assert model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert 0 < report.max_merge_error < 1e-2  # bf16 rounding of W + delta, nothing more
    assert rel(merged, expected) <= 2 * bf16_noise


def test_nf4_merge_error_is_measured_and_bounded_by_quantization_error(tiny_base_dir, input_ids):
    """Re-quantizing W + delta costs about one NF4 quantization of a dense weight.

    Re-quantizing the unchanged weight alone is ~0 (NF4 is idempotent on its own grid), so the
    yardstick is the error of quantizing the dense checkpoint to NF4 in the first place.
    """
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    dense = moa.MixtureModel.from_pretrained(tiny_base_dir, quantization=None)
    model = moa.MixtureModel.from_pretrained(tiny_base_dir, quantization="nf4")
    add(model, "a", 1, shrink=0.3)
    layer0 = model.base_model.model.layers[0].self_attn.q_proj.base_layer
    settings = (layer0.weight.quant_state.blocksize, layer0.weight.quant_state.quant_type,
                layer0.weight.quant_state.nested, layer0.weight.data.dtype)
    dense_logits = logits(dense, input_ids)
    with model.disable_adapters():
        nf4_logits = logits(model, input_ids)
    unmerged = logits(model, input_ids)
    quantization_error = rel(nf4_logits, dense_logits)
    report = merge_into_base(model, "a", sample_input_ids=input_ids, progress=False)
    with model.disable_adapters():
        merged = logits(model, input_ids)
    print(f"\nNF4 merge: {report.summary()}; NF4 quantization of the dense base alone: {quantization_error:.3e}")

    measured = rel(merged, unmerged)
    assert report.output_error == pytest.approx(measured, rel=1e-4)
    assert 0 < measured <= 3 * quantization_error
    assert measured < rel(nf4_logits, unmerged)  # the merged model is closer to base+adapter than the base is
    assert report.quantization == "nf4" and report.mean_requant_error < 0.05 * report.mean_merge_error
    layer0 = model.base_model.model.layers[0].self_attn.q_proj.base_layer
    state = layer0.weight.quant_state
    assert (state.blocksize, state.quant_type, state.nested, layer0.weight.data.dtype) == settings
    dense_layers = {m.module_name: m.base_layer for m in dense.mixture_layers()} or {
        name: module for name, module in dense.base_model.named_modules() if isinstance(module, torch.nn.Linear)
    }
    for entry in report.layers:  # per layer: merge error vs quantizing the dense weight once
        weight = dense_layers[entry.module_name].weight.detach().float()
        packed, qstate = quantize_4bit(weight, blocksize=settings[0], compress_statistics=settings[2], quant_type="nf4")
        x = torch.randn(64, weight.shape[1], generator=torch.Generator().manual_seed(0))
        once = rel(x @ dequantize_4bit(packed, qstate).float().T, x @ weight.T)
        assert 0 < entry.merge_error <= 3 * once, entry


def test_save_merged_writes_a_dense_model_transformers_loads(tiny_base_dir, input_ids, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = moa.MixtureModel.from_pretrained(tiny_base_dir, quantization=None)
    add(model, "a", 1)
    add(model, "b", 2, targets=["q_proj", "v_proj"])
    mixture = {"a": 0.5, "b": 0.5}
    expected = logits(model, input_ids, adapter_weights=mixture)
    out = save_merged(model, tmp_path / "fp32", dtype=torch.float32, adapters=mixture, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(loaded, input_ids), expected, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out) is not None
    assert model.adapter_names == ["a", "b"]  # the model itself is unchanged
    assert torch.equal(logits(model, input_ids, adapter_weights=mixture), expected)
    bf16 = AutoModelForCausalLM.from_pretrained(save_merged(model, tmp_path / "bf16", adapters=mixture, progress=False))
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert rel(logits(bf16.eval(), input_ids), expected) < 3e-2


def test_save_merged_from_nf4_dequantizes_instead_of_requantizing(tiny_base_dir, input_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = moa.MixtureModel.from_pretrained(tiny_base_dir, quantization="nf4")
    add(model, "a", 1, shrink=0.3)
    unmerged = logits(model, input_ids)
    loaded = AutoModelForCausalLM.from_pretrained(save_merged(model, tmp_path / "d", dtype=torch.float32,
                                                              progress=False)).eval()
    assert rel(logits(loaded, input_ids), unmerged) < 1e-5


def test_bad_requests_raise_before_anything_changes(tiny_model):
    with pytest.raises(MergeError, match="No adapter is active"):
        merge_into_base(tiny_model, progress=False)
    add(tiny_model, "a", 1)
    weight = tiny_model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with pytest.raises(UnknownAdapterError, match="No adapter named 'x'"):
        merge_into_base(tiny_model, {"a": 1.0, "x": 1.0}, progress=False)
    with pytest.raises(MergeError, match="2 adapters"):
        merge_into_base(tiny_model, ["a", "a"], [1.0], progress=False)
    with pytest.raises(MergeError, match="finite weight"):
        merge_into_base(tiny_model, {"a": float("inf")}, progress=False)
    assert torch.equal(tiny_model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight, weight)
    assert tiny_model.adapter_names == ["a"]
