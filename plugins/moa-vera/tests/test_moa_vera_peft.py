"""VeRA folders move between PEFT and moa with the same logits; merging and training agree with PEFT."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import moa
from moa.errors import AdapterFormatError, AdapterShapeError
from moa.testing import load_tiny_base, random_input_ids, require_plugin

moa_vera = require_plugin("moa-vera", "moa_vera")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5


def peft_vera(base_dir, seed: int = 0, **overrides):
    """A PEFT VeRA model on the tiny base with random non-zero vectors (fp32, eval)."""
    config = dict(r=16, target_modules=TARGETS, projection_prng_key=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when save_projection=False
        model = peft.get_peft_model(load_tiny_base(base_dir), peft.VeraConfig(**{**config, **overrides})).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def logits(model, input_ids, **routing) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **routing).logits


def load_in_peft(base_dir, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(load_tiny_base(base_dir), folder).eval()


@pytest.mark.parametrize("save_projection", [True, False], ids=["projection-saved", "projection-regenerated"])
def test_peft_made_vera_loads_in_moa_with_same_logits(moa_tiny_base_dir, tmp_path, save_projection, vera_path):
    peft_model = peft_vera(moa_tiny_base_dir, save_projection=save_projection)
    peft_model.save_pretrained(tmp_path / "peft")
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ("base_model.vera_A" in tensors) == save_projection
    input_ids = random_input_ids(3, 8)
    expected = logits(peft_model, input_ids)
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="vera")
    assert isinstance(model.peft_config["vera"], moa_vera.VeraConfig)
    got = logits(model, input_ids, adapter_names=["vera"] * 3)
    torch.testing.assert_close(got, expected, rtol=ATOL, atol=ATOL)
    assert not torch.allclose(got, logits(model, input_ids, adapter_names=[None] * 3), atol=1e-3)


def test_regenerated_projection_is_peft_s_exactly(moa_tiny_base_dir):
    peft_model = peft_vera(moa_tiny_base_dir, r=24, projection_prng_key=1234)
    vera_a, vera_b = peft_model.base_model.vera_A["default"], peft_model.base_model.vera_B["default"]
    ours_a, ours_b = moa_vera.generate_projection(24, vera_a.shape[1], vera_b.shape[0], 1234)
    assert torch.equal(ours_a, vera_a) and torch.equal(ours_b, vera_b)


@pytest.mark.parametrize("save_projection", [True, False], ids=["projection-saved", "projection-regenerated"])
def test_moa_saved_vera_loads_in_peft_with_same_logits(moa_tiny_model, moa_tiny_base_dir, tmp_path, save_projection):
    moa_tiny_model.add_adapter("m", moa_vera.VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=3,
                                                        save_projection=save_projection, init_weights=False))
    moa_tiny_model.save_adapter("m", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "VERA" and saved["save_projection"] is save_projection
    assert saved["r"] == 16 and saved["projection_prng_key"] == 3
    tensors = load_file(tmp_path / "m" / "adapter_model.safetensors")
    assert sorted(k for k in tensors if not k.startswith("base_model.model.")) == (
        ["base_model.vera_A", "base_model.vera_B"] if save_projection else [])
    peft_model = load_in_peft(moa_tiny_base_dir, tmp_path / "m")
    input_ids = random_input_ids(4, 6)
    torch.testing.assert_close(logits(moa_tiny_model, input_ids, adapter_names=["m"] * 4),
                               logits(peft_model, input_ids), rtol=ATOL, atol=ATOL)


def test_merge_and_unload_equals_peft_s(moa_tiny_base_dir, tmp_path, vera_path):
    peft_model = peft_vera(moa_tiny_base_dir, seed=5)
    peft_model.save_pretrained(tmp_path / "peft")
    input_ids = random_input_ids(2, 7)
    peft_merged = peft_model.merge_and_unload()
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="vera")
    model.set_adapter("vera")
    merged = model.merge_and_unload(progress=False)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged, input_ids), logits(peft_merged, input_ids), rtol=ATOL, atol=ATOL)
    for name, param in peft_merged.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], param, rtol=1e-5, atol=1e-6, msg=name)


def test_default_peft_config_loads_on_a_default_model_and_a_rank_above_the_cap_is_refused(
        moa_tiny_base_dir, tmp_path):
    peft_vera(moa_tiny_base_dir, r=256, target_modules=None).save_pretrained(tmp_path / "default")  # PEFT defaults
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))  # max_rank: 256 by default
    model.load_adapter(tmp_path / "default", adapter_name="d")
    assert model.peft_config["d"].r == 256
    assert sorted({m.rsplit(".", 1)[-1] for m in model.adapter_layers("d")}) == ["q_proj", "v_proj"]
    peft_vera(moa_tiny_base_dir, r=300).save_pretrained(tmp_path / "big")
    with pytest.raises(AdapterShapeError, match="max_rank"):
        model.load_adapter(tmp_path / "big", adapter_name="big")
    small = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir), max_rank=512)
    small.load_adapter(tmp_path / "big", adapter_name="big")  # a raised cap takes it


def test_broken_projections_are_refused_and_nothing_is_loaded(moa_tiny_base_dir, tmp_path):
    peft_vera(moa_tiny_base_dir).save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(weights)
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    save_file({k: v for k, v in tensors.items() if k != "base_model.vera_B"}, weights)
    with pytest.raises(AdapterFormatError, match="save_projection"):
        model.load_adapter(tmp_path / "p", adapter_name="v")
    save_file({**tensors, "base_model.vera_A": tensors["base_model.vera_A"][:, :64].contiguous()}, weights)
    with pytest.raises(AdapterShapeError, match="vera_A"):
        model.load_adapter(tmp_path / "p", adapter_name="v")
    assert model.adapter_names == []


def test_training_steps_match_peft_s(moa_tiny_model, moa_tiny_base_dir, vera_path):
    """Three SGD steps on the vectors give PEFT's vectors (fresh factors every step, none stale)."""
    config = dict(r=16, target_modules=TARGETS, projection_prng_key=7, init_weights=False)
    torch.manual_seed(11)
    peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir), peft.VeraConfig(**config))
    moa_tiny_model.add_adapter("t", moa_vera.VeraConfig(**config))
    ours = moa_tiny_model.adapter_layers("t")
    theirs = {n: p for n, p in peft_model.named_parameters() if "vera_lambda" in n}
    with torch.no_grad():
        for name, layer in ours.items():
            for suffix in ("vera_lambda_b", "vera_lambda_d"):
                getattr(layer, suffix).copy_(theirs[f"base_model.model.{name}.{suffix}.default"])
    moa_params = [p for layer in ours.values() for p in layer.parameters()]
    opt_moa = torch.optim.SGD(moa_params, lr=0.1)
    opt_peft = torch.optim.SGD(list(theirs.values()), lr=0.1)
    input_ids = random_input_ids(2, 8, seed=4)
    for _ in range(3):
        for model, opt, kwargs in ((moa_tiny_model, opt_moa, {"adapter_names": ["t", "t"]}),
                                   (peft_model, opt_peft, {})):
            loss = model(input_ids, labels=input_ids, **kwargs).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    for name, layer in ours.items():
        torch.testing.assert_close(layer.vera_lambda_d, theirs[f"base_model.model.{name}.vera_lambda_d.default"],
                                   rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in moa_tiny_model.base_model.parameters() if not p.requires_grad)
