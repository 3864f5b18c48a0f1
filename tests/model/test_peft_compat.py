"""PEFT compatibility with the real ``peft`` package: files both ways, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import moa
from moa.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_safetensors

peft = pytest.importorskip("peft")


def fresh_base(path):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def peft_adapter_dir(base_dir, out_dir, seed=0, **config):
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(fresh_base(base_dir), peft.LoraConfig(init_lora_weights=False, **config))
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize(
    "config",
    [
        dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
        dict(r=8, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2},
             alpha_pattern={"q_proj": 3}),
    ],
    ids=["qv", "all-linear-rslora", "patterns"],
)
def test_peft_saved_adapter_loads_in_moa_with_same_logits(tiny_base_dir, tmp_path, input_ids, config):
    peft_model = peft_adapter_dir(tiny_base_dir, tmp_path / "peft", **config).eval()
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    model = moa.MixtureModel(fresh_base(tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="p")
    with torch.no_grad():
        got = model(input_ids, adapter_names=["p"] * len(input_ids)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, model(input_ids, adapter_names=[None] * 4).logits)


def test_moa_saved_adapter_loads_in_peft_with_same_logits(tiny_model, tiny_base_dir, tmp_path, input_ids):
    torch.manual_seed(5)
    tiny_model.add_adapter("m", moa.LoraConfig(r=6, lora_alpha=12, target_modules="all-linear", init_lora_weights=False))
    tiny_model.save_adapter("m", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 6
    assert saved["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    tensors, metadata = read_safetensors(tmp_path / "m" / WEIGHTS_NAME)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert metadata["moa.base_fingerprint"] == tiny_model.base_fingerprint

    peft_model = peft.PeftModel.from_pretrained(fresh_base(tiny_base_dir), tmp_path / "m").eval()
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        got = tiny_model(input_ids, adapter_names=["m"] * 4).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_round_trip_moa_save_and_load(tiny_model, tiny_base_dir, tmp_path, input_ids):
    torch.manual_seed(6)
    tiny_model.add_adapter("x", moa.LoraConfig(r=3, target_modules=["k_proj", "up_proj"], init_lora_weights=False))
    tiny_model.save_adapter("x", tmp_path / "x")
    other = moa.MixtureModel(fresh_base(tiny_base_dir))
    other.load_adapter(tmp_path / "x", adapter_name="x")
    with torch.no_grad():
        torch.testing.assert_close(
            other(input_ids, adapter_names=["x"] * 4).logits,
            tiny_model(input_ids, adapter_names=["x"] * 4).logits,
            rtol=0, atol=0,
        )


def test_mixed_batch_equals_peft_adapter_names(tiny_base_dir, tmp_path, input_ids):
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(
        fresh_base(tiny_base_dir),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
        adapter_name="one",
    )
    torch.manual_seed(1)
    peft_model.add_adapter("two", peft.LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "both")
    rows = ["one", "__base__", "two", "one"]
    with torch.no_grad():
        expected = peft_model.eval()(input_ids, adapter_names=rows).logits
    model = moa.MixtureModel(fresh_base(tiny_base_dir))
    model.load_adapter(tmp_path / "both" / "one", adapter_name="one")
    model.load_adapter(tmp_path / "both" / "two", adapter_name="two")
    with torch.no_grad():
        got = model(input_ids, adapter_names=rows).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_saving_twice_gives_identical_bytes(tiny_model, tmp_path):
    torch.manual_seed(8)
    tiny_model.add_adapter("d", moa.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    tiny_model.save_adapter("d", tmp_path / "one")
    tiny_model.save_adapter("d", tmp_path / "two")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
