"""DoRA folders move between PEFT and moa with the same logits, dense and NF4; DoRA trains."""

from __future__ import annotations

import json

import pytest
import torch

import moa
from moa.errors import AdapterConfigError
from moa.testing import fresh_plugin_manager, load_tiny_base, random_input_ids, require_plugin

moa_dora = require_plugin("moa-dora", "moa_dora")
peft = pytest.importorskip("peft")


def make_peft_dora(base, out_dir, seed=0, **config):
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(use_dora=True, init_lora_weights=False, **config))
    with torch.no_grad():  # a trained-looking magnitude, not just ||W + sBA||
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
    peft_model.eval().save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    ],
    ids=["qv", "all-linear-rslora"],
)
def test_peft_dora_loads_in_moa_with_same_logits(moa_tiny_base_dir, tmp_path, config):
    peft_model = make_peft_dora(load_tiny_base(moa_tiny_base_dir), tmp_path / "peft", **config)
    input_ids = random_input_ids(3, 8)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="d")
    assert isinstance(model.peft_config["d"], moa_dora.DoraConfig)
    with torch.no_grad():
        got = model(input_ids, adapter_names=["d"] * 3).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_moa_saved_dora_loads_in_peft_with_same_logits(moa_tiny_model, moa_tiny_base_dir, tmp_path):
    torch.manual_seed(4)
    moa_tiny_model.add_adapter("m", moa_dora.DoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                                                        init_lora_weights=False))
    input_ids = random_input_ids(4, 6)
    with torch.no_grad():
        got = moa_tiny_model(input_ids, adapter_names=["m"] * 4).logits
    moa_tiny_model.save_adapter("m", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] is True
    peft_model = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "m").eval()
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_plain_lora_folders_stay_lora_and_dora_needs_the_plugin(moa_tiny_base_dir, tmp_path, monkeypatch):
    torch.manual_seed(0)
    plain = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "lora")
    make_peft_dora(load_tiny_base(moa_tiny_base_dir), tmp_path / "dora", r=2, target_modules=["q_proj"])
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "lora", adapter_name="lora")
    assert type(model.peft_config["lora"]) is moa.LoraConfig
    monkeypatch.setenv("MOA_DISABLE_PLUGINS", "dora")
    with fresh_plugin_manager(), pytest.raises(AdapterConfigError, match="moa-dora"):
        model.load_adapter(tmp_path / "dora", adapter_name="dora")
    assert model.adapter_names == ["lora"]


def test_dora_on_an_nf4_base_matches_peft(moa_tiny_base_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from moa.model.base_loading import load_base

    def nf4_base():
        return load_base(str(moa_tiny_base_dir), quantization="nf4", device="cpu")[0]

    peft_model = make_peft_dora(nf4_base(), tmp_path / "peft", r=4, lora_alpha=8,
                                target_modules=["q_proj", "down_proj"])
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    model = moa.MixtureModel(nf4_base())
    model.load_adapter(tmp_path / "peft", adapter_name="d")
    with torch.no_grad():
        got = model(input_ids, adapter_names=["d", "d"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_few_optimizer_steps_lower_the_loss(moa_tiny_model):
    model = moa_tiny_model
    model.add_adapter("fit", moa_dora.DoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    params = [p for layer in model.adapter_layers("fit").values() for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    input_ids = random_input_ids(4, 12, seed=7)
    losses = []
    for _ in range(8):
        loss = model(input_ids, adapter_names=["fit"] * 4, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
