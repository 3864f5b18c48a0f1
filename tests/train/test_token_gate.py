"""A per-token gate trained end to end through the LM loss, in the same pass as it routes."""

from __future__ import annotations

import torch

from moa.data.chat import encode_sft_example, pad_batch
from moa.routing.learned_gate import LearnedGate
from moa.train.recipes import DEFAULT_HIDDEN_LAYER
from moa.train.router import train_gate_lm
from tests.train.helpers import TOY_DOMAINS, add_random_adapters, toy_examples


def token_gate(model, seed: int = 0) -> LearnedGate:
    torch.manual_seed(seed)
    return LearnedGate(list(TOY_DOMAINS), model.config.hidden_size, hidden_layer=DEFAULT_HIDDEN_LAYER,
                       level="token", top_k=2, mlp_hidden=8, dropout=0.0)


def test_in_pass_token_routing_equals_the_decision_computed_outside(tiny_chat_model):
    """The reference: layer-2 features from a partial pass, the gate's decision per token, pinned."""
    model = tiny_chat_model
    add_random_adapters(model)
    gate = token_gate(model)
    ids, _ = encode_sft_example(model.tokenizer, "abc what", "xa")
    batch = pad_batch([ids, ids[:-2]], model.tokenizer.pad_token_id)
    with torch.no_grad():
        routed = model(**batch, adapter_names=["auto", "auto"], router=gate).logits
        hidden = model.hidden_states_at(DEFAULT_HIDDEN_LAYER, batch["input_ids"], batch["attention_mask"])
        decision = gate.decision_from_features(hidden.reshape(-1, hidden.shape[-1]), model.adapter_names, level="token")
        pinned = model(**batch, routing_decision=decision, adapters_from_layer=DEFAULT_HIDDEN_LAYER).logits
        plain = model(**batch, adapter_names=[None, None]).logits
    assert torch.allclose(routed, pinned, atol=1e-5)
    assert not torch.allclose(routed, plain, atol=1e-3)  # the adapters did act


def test_token_gate_learns_through_the_lm_loss_with_everything_else_frozen(tiny_chat_model):
    model = tiny_chat_model
    add_random_adapters(model)
    gate = token_gate(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = [p.detach().clone() for p in gate.head.parameters()]
    metrics = train_gate_lm(model, gate, toy_examples(6), steps=12, batch_size=4, lr=5e-2, progress=False)
    assert metrics["weight_change_l1"] > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, gate.head.parameters()) if b.dim() > 1)
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0]
    for name, p in model.named_parameters():
        if not name.startswith("_router") and "gate.head" not in name:
            assert torch.equal(frozen[name], p), name
    assert gate.level == "token" and not gate.training
    # standardisation comes from per-token features, not left at the identity
    assert not bool(gate.head.feature_std.eq(1).all())
