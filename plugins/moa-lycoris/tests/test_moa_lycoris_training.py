"""LoHa and LoKr adapters train like any moa adapter: only their factors move, and the loss drops."""

from __future__ import annotations

import pytest
import torch

from moa.testing import random_input_ids, require_plugin

moa_lycoris = require_plugin("moa-lycoris", "moa_lycoris")


@pytest.mark.parametrize(
    "config",
    [
        lambda: moa_lycoris.LoHaConfig(r=4, alpha=8, target_modules="all-linear", rank_dropout=0.1),
        lambda: moa_lycoris.LoKrConfig(r=2, alpha=4, decompose_both=True, target_modules="all-linear",
                                       module_dropout=0.1),
    ],
    ids=["loha", "lokr"],
)
def test_a_few_optimizer_steps_lower_the_loss(config, moa_tiny_model):
    model = moa_tiny_model
    torch.manual_seed(0)
    model.add_adapter("fit", config())
    model.train()
    params = [p for layer in model.adapter_layers("fit").values() for p in layer.parameters()]
    frozen = {name: p.detach().clone() for name, p in model.base_model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam(params, lr=2e-2)
    input_ids = random_input_ids(4, 12, seed=7)
    losses = []
    for _ in range(10):
        loss = model(input_ids, adapter_names=["fit"] * 4, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[name]) for name, p in model.base_model.named_parameters() if name in frozen)
