"""IA3 folders move between PEFT and moa with the same logits; IA3 trains."""

from __future__ import annotations

import json

import pytest
import torch

import moa
from moa.testing import load_tiny_base, random_input_ids, require_plugin

moa_ia3 = require_plugin("moa-ia3", "moa_ia3")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        dict(target_modules=r".*\.(q_proj|up_proj|down_proj)", feedforward_modules=r".*\.(up_proj|down_proj)"),
    ],
    ids=["kv-down", "regex"],
)
def test_peft_made_ia3_loads_in_moa_with_same_logits(moa_tiny_base_dir, tmp_path, config):
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir),
                                     peft.IA3Config(init_ia3_weights=False, **config)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    input_ids = random_input_ids(3, 8)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="ia3")
    assert isinstance(model.peft_config["ia3"], moa_ia3.IA3Config)
    with torch.no_grad():
        got = model(input_ids, adapter_names=["ia3"] * 3).logits
        base = model(input_ids, adapter_names=[None] * 3).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


def test_moa_saved_ia3_loads_in_peft_with_same_logits(moa_tiny_model, moa_tiny_base_dir, tmp_path):
    torch.manual_seed(3)
    moa_tiny_model.add_adapter("m", moa_ia3.IA3Config(init_ia3_weights=False))
    moa_tiny_model.save_adapter("m", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "IA3"
    assert saved["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert saved["feedforward_modules"] == ["down_proj"]
    peft_model = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "m").eval()
    input_ids = random_input_ids(4, 6)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        got = moa_tiny_model(input_ids, adapter_names=["m"] * 4).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_few_optimizer_steps_lower_the_loss(moa_tiny_model):
    model = moa_tiny_model
    model.add_adapter("fit", moa_ia3.IA3Config())
    params = [p for layer in model.adapter_layers("fit").values() for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=5e-2)
    input_ids = random_input_ids(4, 12, seed=7)
    losses = []
    for _ in range(8):
        loss = model(input_ids, adapter_names=["fit"] * 4, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is None for p in model.base_model.parameters() if not p.requires_grad)
