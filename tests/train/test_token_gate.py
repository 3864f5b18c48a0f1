"""A per-token gate trained end to end through the LM loss, in the same pass as it routes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moa.data.chat import encode_sft_example, pad_batch
from moa.routing.learned_gate import LearnedGate
from moa.train.recipes import DEFAULT_HIDDEN_LAYER
from moa.train.router import GateObjective, train_gate_lm
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


def test_routing_labels_add_a_cross_entropy_on_every_labelled_position(tiny_chat_model):
    """The objective's loss = the LM loss + weight x CE(gate logits, label), recomputed outside."""
    model = tiny_chat_model
    add_random_adapters(model)
    gate = token_gate(model)
    rows = [encode_sft_example(model.tokenizer, p, a) for p, a in (("abc what", "xa"), ("de f", "y"))]
    batch = pad_batch([r[0] for r in rows], model.tokenizer.pad_token_id, labels=[r[1] for r in rows])
    targets = torch.tensor([1, -100])  # the first example labelled with the gate's adapter 1, the second free
    objective = GateObjective(model, gate, torch.zeros(0), targets, routing_weight=0.5)
    with torch.no_grad():
        loss = objective(**batch, rows=torch.tensor([0, 1]))["loss"]
        lm = model(**batch, adapter_names=["auto", "auto"], router=gate, use_cache=False)["loss"]
        hidden = model.hidden_states_at(DEFAULT_HIDDEN_LAYER, batch["input_ids"], batch["attention_mask"])
        real = batch["attention_mask"][0].bool()
        ce = F.cross_entropy(gate.logits(hidden[0][real]), torch.full((int(real.sum()),), 1))
    torch.testing.assert_close(loss, lm + 0.5 * ce, rtol=1e-5, atol=1e-5)


def test_routing_labels_keep_labelled_examples_on_their_adapter(tiny_chat_model):
    model = tiny_chat_model
    add_random_adapters(model)
    examples = toy_examples(6)
    names = list(TOY_DOMAINS)
    labels = [names[0]] * len(examples)

    def share_on_first_adapter(gate):
        ids = pad_batch([encode_sft_example(model.tokenizer, e.prompt, e.answer)[0] for e in examples],
                        model.tokenizer.pad_token_id)
        with torch.no_grad():
            hidden = model.hidden_states_at(DEFAULT_HIDDEN_LAYER, ids["input_ids"], ids["attention_mask"])
            top = gate.logits(hidden[ids["attention_mask"].bool()]).argmax(-1)
        return float((top == 0).float().mean())

    free, supervised = token_gate(model, seed=1), token_gate(model, seed=1)
    options = dict(steps=10, batch_size=3, lr=3e-2, progress=False)
    train_gate_lm(model, free, examples, **options)
    train_gate_lm(model, supervised, examples, routing_labels=labels, routing_weight=2.0, **options)
    assert share_on_first_adapter(supervised) > 0.95
    assert share_on_first_adapter(supervised) > share_on_first_adapter(free)
    with pytest.raises(ValueError, match="does not route"):
        train_gate_lm(model, token_gate(model), examples[:1], routing_labels=["nope"], routing_weight=1.0, steps=1,
                      progress=False)
