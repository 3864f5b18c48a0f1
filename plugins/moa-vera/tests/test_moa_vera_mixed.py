"""One batch mixing two VeRA adapters (different projections), a LoRA adapter and base rows equals each row alone.

Every test runs on both VeRA paths (generic and batched: the ``vera_path`` fixture).
"""

from __future__ import annotations

import pytest
import torch

import moa
from moa.testing import random_input_ids, require_plugin

moa_vera = require_plugin("moa-vera", "moa_vera")


@pytest.fixture
def mixed_model(moa_tiny_model, vera_path):
    torch.manual_seed(0)
    model = moa_tiny_model
    model.add_adapter("v1", moa_vera.VeraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                init_weights=False))
    model.add_adapter("v2", moa_vera.VeraConfig(r=8, target_modules=["q_proj", "up_proj"], projection_prng_key=5,
                                                init_weights=False))
    model.add_adapter("lora", moa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                             init_lora_weights=False))
    model.eval()
    on_generic_path = [layer.low_rank() is None
                       for name in ("v1", "v2") for layer in model.adapter_layers(name).values()]
    assert set(on_generic_path) == {vera_path == "generic"}
    return model


def test_mixed_batch_forward_equals_each_row_alone(mixed_model):
    input_ids = random_input_ids(5, 7)
    names = ["v1", "v2", "lora", None, "v1"]
    with torch.no_grad():
        batched = mixed_model(input_ids, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = mixed_model(input_ids[i : i + 1], adapter_names=[name]).logits
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)
        base = mixed_model(input_ids, adapter_names=[None] * 5).logits
    for i, name in enumerate(names):  # each adapter really acts, and base rows stay the base's
        assert torch.allclose(batched[i], base[i], atol=1e-6) == (name is None)
    mixtures = [{"v1": 0.5, "v2": 0.5}, {"v2": 1.0}, {"lora": 0.7, "v1": 0.3}, None, {"v1": 0.2}]
    with torch.no_grad():
        batched = mixed_model(input_ids, adapter_weights=mixtures).logits
        for i, mixture in enumerate(mixtures):
            alone = mixed_model(input_ids[i : i + 1], adapter_weights=[mixture]).logits
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)


def test_mixed_batch_greedy_generate_equals_each_row_alone(mixed_model):
    input_ids = random_input_ids(4, 5, seed=3)
    names = ["v1", "v2", "lora", None]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=257)
    with torch.no_grad():
        batched = mixed_model.generate(input_ids, adapter_names=names, **settings)
        alone = [mixed_model.generate(input_ids[i : i + 1], adapter_names=[name], **settings)
                 for i, name in enumerate(names)]
    for i, row in enumerate(alone):
        assert torch.equal(batched[i : i + 1], row), (names[i], batched[i].tolist(), row[0].tolist())
    assert not torch.equal(alone[0][:, 5:], alone[3][:, 5:])  # a VeRA continuation differs from the base's
