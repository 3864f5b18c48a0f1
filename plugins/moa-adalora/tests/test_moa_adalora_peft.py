"""AdaLoRA folders move between PEFT and moa with the same logits, pruned ranks included; merging matches PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import moa
from moa.testing import load_tiny_base, random_input_ids, require_plugin

moa_adalora = require_plugin("moa-adalora", "moa_adalora")
peft = pytest.importorskip("peft")

CONFIG = dict(target_modules=["q_proj", "v_proj", "up_proj"], init_r=4, target_r=2, lora_alpha=8, total_step=10)
#: A pruned pattern as PEFT's allocator leaves it (keys with the adapter name): ranks 2, 0 and 3.
MASKS = {"model.layers.0.self_attn.q_proj": [True, False, True, False],
         "model.layers.1.self_attn.v_proj": [False] * 4,
         "model.layers.2.mlp.up_proj": [False, True, True, True]}


def make_peft_adalora(base, out_dir, prune=True, seed=0):
    """A PEFT AdaLoRA model with non-zero weights, pruned like the allocator does, saved to ``out_dir``."""
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(base, peft.AdaLoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                                              **CONFIG))
    with torch.no_grad():  # randn factors at a scale that keeps the logits moderate
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.mul_(0.3)
    if prune:
        config = peft_model.peft_config["default"]
        config.rank_pattern = {}
        for name, param in peft_model.base_model.model.named_parameters():
            if name.endswith("lora_E.default"):
                mask = MASKS.get(name.removesuffix(".lora_E.default"), [True] * 4)
                config.rank_pattern[name] = mask
                with torch.no_grad():  # what RankAllocator.mask_to_budget does
                    param.masked_fill_(~torch.tensor(mask)[:, None], 0.0)
    peft_model.eval().save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize("prune", [True, False], ids=["pruned", "full-rank"])
def test_peft_adalora_loads_in_moa_with_same_logits(moa_tiny_base_dir, tmp_path, prune):
    peft_model = make_peft_adalora(load_tiny_base(moa_tiny_base_dir), tmp_path / "peft", prune=prune)
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    if prune:
        assert saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A"].shape == (0, 64)
        assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B"].shape == (64, 2)
    input_ids = random_input_ids(3, 8)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
        reloaded = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "peft").eval()
        torch.testing.assert_close(reloaded(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="ada")
    assert isinstance(model.peft_config["ada"], moa_adalora.AdaLoraConfig)
    ranks = {name: layer.rank for name, layer in model.adapter_layers("ada").items()}
    assert ranks["model.layers.3.mlp.up_proj"] == 4
    if prune:
        assert [ranks[name] for name in MASKS] == [2, 0, 3]
    with torch.no_grad():
        got = model(input_ids, adapter_names=["ada"] * 3).logits
        base = model(input_ids, adapter_names=[None] * 3).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_moa_saved_adalora_loads_in_peft_with_same_logits(moa_tiny_model, moa_tiny_base_dir, tmp_path):
    torch.manual_seed(4)
    moa_tiny_model.add_adapter("m", moa_adalora.AdaLoraConfig(**CONFIG, init_lora_weights=False))
    with torch.no_grad():
        for layer in moa_tiny_model.adapter_layers("m").values():
            for param in layer.parameters():
                param.mul_(0.3)
    input_ids = random_input_ids(4, 6)
    with torch.no_grad():
        got = moa_tiny_model(input_ids, adapter_names=["m"] * 4).logits
    moa_tiny_model.save_adapter("m", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4 and saved["total_step"] == 10
    assert saved["target_modules"] == ["q_proj", "up_proj", "v_proj"]
    peft_model = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "m").eval()
    assert isinstance(peft_model.peft_config["default"], peft.AdaLoraConfig)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pruned_folder_round_trips_through_moa_unchanged(moa_tiny_base_dir, tmp_path):
    make_peft_adalora(load_tiny_base(moa_tiny_base_dir), tmp_path / "peft")
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="ada")
    model.save_adapter("ada", tmp_path / "again")
    before, after = (load_file(tmp_path / folder / "adapter_model.safetensors") for folder in ("peft", "again"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert {k: sum(v) for k, v in config["rank_pattern"].items() if sum(v) < 4} == {
        f"{name}.lora_E": sum(mask) for name, mask in MASKS.items()}


def test_merge_and_unload_equals_peft(moa_tiny_base_dir, tmp_path):
    make_peft_adalora(load_tiny_base(moa_tiny_base_dir), tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "peft")
    expected_model = peft_model.merge_and_unload().eval()
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir))
    model.load_adapter(tmp_path / "peft", adapter_name="ada")
    model.set_adapter("ada")
    merged = model.merge_and_unload(progress=False).eval()
    expected = expected_model.state_dict()
    got = merged.state_dict()
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    input_ids = random_input_ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, expected_model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_pruned_adalora_on_an_nf4_base_matches_peft(moa_tiny_base_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from moa.model.base_loading import load_base

    def nf4_base():
        return load_base(str(moa_tiny_base_dir), quantization="nf4", device="cpu")[0]

    peft_model = make_peft_adalora(nf4_base(), tmp_path / "peft")
    input_ids = random_input_ids(2, 6)
    with torch.no_grad():
        expected = peft_model(input_ids).logits
    model = moa.MixtureModel(nf4_base())
    model.load_adapter(tmp_path / "peft", adapter_name="ada")
    with torch.no_grad():
        got = model(input_ids, adapter_names=["ada", "ada"]).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ranks_are_checked_against_max_rank_by_init_r_not_the_unused_r(moa_tiny_base_dir, tmp_path):
    from moa.errors import AdapterShapeError

    make_peft_adalora(load_tiny_base(moa_tiny_base_dir), tmp_path / "peft")  # init_r=4, PEFT writes r=8
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 8
    model = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir), max_rank=4)
    model.load_adapter(tmp_path / "peft", adapter_name="fits")
    small = moa.MixtureModel(load_tiny_base(moa_tiny_base_dir), max_rank=3)
    with pytest.raises(AdapterShapeError, match="init_r = 4, above the rank cap 3"):
        small.load_adapter(tmp_path / "peft", adapter_name="big")
    assert small.adapter_names == []
