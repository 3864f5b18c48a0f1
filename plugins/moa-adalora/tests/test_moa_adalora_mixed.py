"""AdaLoRA rows share one batch with LoRA and base rows (forward and greedy generate) and ride the batched path."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.testing import random_input_ids, require_plugin

moa_adalora = require_plugin("moa-adalora", "moa_adalora")

#: ranks 2 and 0 on two modules, init_r elsewhere
PATTERN = {"model.layers.0.self_attn.q_proj.lora_E": [True, False, False, True],
           "model.layers.1.self_attn.v_proj.lora_E": [False] * 4}


@pytest.fixture
def mixed_model(moa_tiny_model):
    model = moa_tiny_model
    torch.manual_seed(0)
    model.add_adapter("lora", moa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                             init_lora_weights=False))
    for name, pattern in (("ada", None), ("pruned", PATTERN)):
        model.add_adapter(name, moa_adalora.AdaLoraConfig(
            target_modules=["q_proj", "v_proj", "down_proj"], init_r=4, target_r=2, total_step=10,
            init_lora_weights=False, rank_pattern=pattern))
        with torch.no_grad():
            for layer in model.adapter_layers(name).values():
                for param in layer.parameters():
                    param.mul_(0.3)
    return model.eval()


def test_adalora_takes_the_batched_low_rank_path(mixed_model):
    layer = mixed_model.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        stack = layer.stack()
    slots = {name: i for i, name in enumerate(mixed_model.adapter_names)}
    assert stack.ranks[slots["ada"]] == 4 and stack.ranks[slots["pruned"]] == 2 and stack.ranks[slots["lora"]] == 4
    ada = mixed_model.adapter_layers("ada")["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(stack.lora_a[slots["ada"]], ada.lora_A.detach() * ada.lora_E.detach())


def test_mixed_batch_forward_equals_each_row_alone(mixed_model):
    input_ids = random_input_ids(5, 7)
    names = ["lora", "ada", None, "pruned", "ada"]
    with torch.no_grad():
        batched = mixed_model(input_ids, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = mixed_model(input_ids[i : i + 1], adapter_names=[name]).logits
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)
        base = mixed_model(input_ids[1:2], adapter_names=[None]).logits
    assert (batched[1:2] - base).abs().max() > 1e-2  # the AdaLoRA row did change
    mixtures = [{"lora": 0.5, "ada": 0.5}, {"ada": 1.0}, None, {"pruned": 0.7, "lora": 0.3}, {"ada": 0.2}]
    with torch.no_grad():
        batched = mixed_model(input_ids, adapter_weights=mixtures).logits
        for i, mixture in enumerate(mixtures):
            alone = mixed_model(input_ids[i : i + 1], adapter_weights=[mixture]).logits
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)


def test_mixed_batch_greedy_generate_equals_each_row_alone(mixed_model):
    input_ids = random_input_ids(4, 5, seed=3)
    names = ["lora", "ada", None, "pruned"]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=257)
    with torch.no_grad():
        batched = mixed_model.generate(input_ids, adapter_names=names, **settings)
        alone = [mixed_model.generate(input_ids[i : i + 1], adapter_names=[name], **settings)
                 for i, name in enumerate(names)]
    for i, row in enumerate(alone):
        assert torch.equal(batched[i : i + 1], row), (names[i], batched[i].tolist(), row[0].tolist())
    assert not torch.equal(alone[1], alone[2])  # AdaLoRA's continuation differs from the base's


def test_changing_a_factor_changes_the_next_forward(mixed_model):
    input_ids = random_input_ids(1, 6)
    with torch.no_grad():
        before = mixed_model(input_ids, adapter_names=["ada"]).logits
        for layer in mixed_model.adapter_layers("ada").values():
            layer.lora_E.zero_()  # as the allocator masks every rank
        after = mixed_model(input_ids, adapter_names=["ada"]).logits
        base = mixed_model(input_ids, adapter_names=[None]).logits
    assert (before - base).abs().max() > 1e-2
    torch.testing.assert_close(after, base, rtol=0, atol=1e-6)
