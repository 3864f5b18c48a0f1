"""The issue's acceptance check: one batch mixing LoRA, DoRA, IA3 and base rows equals each row alone."""

from __future__ import annotations

import torch

import moa
from moa.testing import random_input_ids, require_plugin

moa_dora = require_plugin("moa-dora", "moa_dora")
moa_ia3 = require_plugin("moa-ia3", "moa_ia3")


def test_batch_mixing_lora_dora_ia3_rows_equals_each_row_alone(moa_tiny_model):
    model = moa_tiny_model
    torch.manual_seed(0)
    model.add_adapter("lora", moa.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter("dora", moa_dora.DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    model.add_adapter("ia3", moa_ia3.IA3Config(init_ia3_weights=False))
    input_ids = random_input_ids(6, 9)
    names = ["lora", "dora", "ia3", None, "dora", "lora"]
    mixtures = [{"lora": 1.0}, {"dora": 0.6, "ia3": 0.4}, {"ia3": 1.0}, None,
                {"lora": 0.5, "dora": 0.5}, {"lora": 0.2, "dora": 0.3, "ia3": 0.5}]
    with torch.no_grad():
        for routing in ({"adapter_names": names}, {"adapter_weights": mixtures}):
            (key, rows), = routing.items()
            batched = model(input_ids, **routing).logits
            for i, row in enumerate(rows):
                alone = model(input_ids[i : i + 1], **{key: [row]}).logits
                torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)
        # and each adapter really acts: no two rows of different adapters agree with the base
        base = model(input_ids, adapter_names=[None] * 6).logits
        outputs = model(input_ids, adapter_names=names).logits
    for i, name in enumerate(names):
        assert torch.allclose(outputs[i], base[i], atol=1e-6) == (name is None)


def test_merging_a_dora_adapter_into_an_fp32_base_keeps_its_logits(moa_tiny_model):
    torch.manual_seed(3)
    moa_tiny_model.add_adapter("d", moa_dora.DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                        init_lora_weights=False))
    with torch.no_grad():  # a magnitude away from ||W + sBA||, so both DoRA terms matter
        for layer in moa_tiny_model.adapter_layers("d").values():
            layer.lora_magnitude_vector.mul_(1.3)
    ids = random_input_ids(2, 6)
    with torch.no_grad():
        before = moa_tiny_model(ids, adapter_names=["d", "d"]).logits
        base = moa_tiny_model(ids, adapter_names=[None, None]).logits
    moa_tiny_model.merge_into_base("d")
    with torch.no_grad():
        after = moa_tiny_model(ids, adapter_names=[None, None]).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert (before - base).abs().max() > 1e-3  # the adapter did change the logits
