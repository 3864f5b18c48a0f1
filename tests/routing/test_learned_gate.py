"""The learned gate: semantics, persistence, training on labels, in-pass routing."""

from __future__ import annotations

import json

import pytest
import torch

import moa
from moa.errors import RoutingError, UnknownAdapterError
from moa.routing.learned_gate import CONFIG_NAME, WEIGHTS_NAME, LearnedGate, top_k_weights
from moa.routing.router import RoutingRequest
from moa.train.router import collect_features, gate_accuracy, train_gate_on_labels, train_router
from tests.train.helpers import TOY_DOMAINS, add_random_adapters, load_tiny, toy_examples

NAMES = ["sql", "code", "math", "french"]


def _gate(**kw) -> LearnedGate:
    torch.manual_seed(0)
    return LearnedGate(NAMES, hidden_size=16, hidden_layer=1, **kw)


def _request(hidden, names=("base_only", *NAMES), mask=None):
    return RoutingRequest(input_ids=torch.zeros(hidden.shape[:2], dtype=torch.long), adapter_names=list(names),
                          attention_mask=mask, hidden_states=hidden)


def test_registered_as_builtin_router_plugin():
    assert moa.get_router("learned_gate") is LearnedGate


def test_top_k_keeps_the_largest_and_renormalises():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.1, 0.1]])
    idx, w = top_k_weights(probs, 2)
    assert idx.tolist() == [[1, 2], [0, 1]] or idx.tolist() == [[1, 2], [0, 2]] or idx[1, 0] == 0
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    torch.testing.assert_close(w[0], torch.tensor([0.5 / 0.8, 0.3 / 0.8]))
    _, w1 = top_k_weights(probs, 1)
    assert torch.equal(w1, torch.ones(2, 1))
    _, wall = top_k_weights(probs, 99)  # clipped to the number of adapters
    assert wall.shape == (2, 4)


def test_route_maps_gate_adapters_to_model_slots_with_top_k_and_temperature():
    gate = _gate(top_k=2)
    hidden = torch.randn(3, 5, 16)
    decision = gate.route(_request(hidden))
    assert decision.level == "row" and decision.ids.shape == (3, 2) and decision.ids.dtype == torch.int32
    assert (decision.ids >= 1).all()  # slot 0 ('base_only') is not one of the gate's adapters
    torch.testing.assert_close(decision.weights.sum(-1), torch.ones(3))
    features = hidden.mean(1)
    sharp, flat = _gate(top_k=4, temperature=0.05), _gate(top_k=4, temperature=50.0)
    flat.head.load_state_dict(sharp.head.state_dict())
    assert sharp.probabilities(features).max(-1).values.min() > flat.probabilities(features).max(-1).values.max()
    assert (flat.probabilities(features) - 0.25).abs().max() < 0.05
    assert torch.equal(sharp.probabilities(features).argmax(-1), flat.probabilities(features).argmax(-1))


def test_pooling_ignores_padding():
    gate = _gate()
    hidden = torch.randn(1, 4, 16)
    padded = torch.cat([torch.full((1, 3, 16), 100.0), hidden], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    a = gate.route(_request(hidden))
    b = gate.route(_request(padded, mask=mask))
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.weights, b.weights)


def test_token_level_gives_one_decision_per_token():
    gate = _gate(level="token", top_k=2)
    decision = gate.route(_request(torch.randn(2, 3, 16)))
    assert decision.level == "token" and decision.ids.shape == (6, 2)


def test_missing_adapter_and_missing_hidden_states_are_clear_errors():
    gate = _gate()
    with pytest.raises(UnknownAdapterError, match="math"):
        gate.route(_request(torch.randn(1, 2, 16), names=("sql", "code", "french")))
    with pytest.raises(RoutingError, match="hidden states"):
        gate.route(RoutingRequest(input_ids=torch.zeros(1, 2, dtype=torch.long), adapter_names=NAMES))
    with pytest.raises(RoutingError):
        LearnedGate(["a", "a"], hidden_size=4)
    with pytest.raises(RoutingError):
        LearnedGate(["a"], hidden_size=4, temperature=0)


def test_save_load_round_trip(tmp_path):
    gate = _gate(top_k=2, temperature=0.7, mlp_hidden=8)
    gate.head.set_normalization(torch.randn(20, 16) * 3 + 1)
    gate.metadata["note"] = "hello"
    gate.save(tmp_path / "gate")
    assert sorted(p.name for p in (tmp_path / "gate").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    config = json.loads((tmp_path / "gate" / CONFIG_NAME).read_text())
    assert config["router"] == "learned_gate" and config["hidden_layer"] == 1 and config["top_k"] == 2
    loaded = LearnedGate.load(tmp_path / "gate")
    features = torch.randn(5, 16)
    torch.testing.assert_close(loaded.probabilities(features), gate.eval().probabilities(features))
    assert loaded.metadata["note"] == "hello" and loaded.temperature == 0.7
    assert LearnedGate.load(tmp_path / "gate", top_k=1).top_k == 1


def test_load_rejects_missing_and_corrupt_files(tmp_path):
    gate = _gate()
    gate.save(tmp_path / "g")
    (tmp_path / "g" / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(RoutingError, match="safetensors"):
        LearnedGate.load(tmp_path / "g")
    with pytest.raises(RoutingError, match="router_config.json"):
        LearnedGate.load(tmp_path / "nothing")
    gate.save(tmp_path / "g")  # overwrite atomically: the folder is whole again
    assert LearnedGate.load(tmp_path / "g").gate_adapters == NAMES


def test_training_on_separable_features_reaches_high_accuracy():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    labels = torch.arange(4).repeat_interleave(60)
    features = centers[labels] + torch.randn(240, 16, generator=g) + 50.0  # offset: normalisation matters
    gate = _gate()
    metrics = train_gate_on_labels(gate, features, labels, epochs=60)
    test_labels = torch.arange(4).repeat_interleave(25)
    test = centers[test_labels] + torch.randn(100, 16, generator=g) + 50.0
    assert metrics["train_accuracy"] > 0.97
    assert gate_accuracy(gate, test, test_labels) > 0.95


def test_in_pass_routing_matches_offline_features(tiny_base_dir):
    """What the gate decides inside generate (left-padded batch) equals the offline features."""
    model = load_tiny(tiny_base_dir)
    add_random_adapters(model)
    examples = toy_examples(8)
    gate, metrics = train_router(model, examples, list(TOY_DOMAINS), progress=False, top_k=2)
    assert gate.hidden_layer == 2  # the default, inside the tiny base's 4 layers
    assert metrics["train_accuracy"] > 0.9
    prompts = [e.prompt for e in examples[:6]]
    offline = gate.decision_from_features(collect_features(model, prompts, gate.hidden_layer), model.adapter_names)
    seen = []
    original = gate.route

    def spy(request):
        decision = original(request)
        seen.append(decision)
        return decision

    gate.route = spy
    model.set_router(gate)
    from moa.data.chat import encode_prompts

    inputs = encode_prompts(model.tokenizer, prompts)
    model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    assert len(seen) == 1  # sequence level: one decision for the whole generate call
    assert torch.equal(seen[0].ids, offline.ids)
    torch.testing.assert_close(seen[0].weights, offline.weights, atol=1e-5, rtol=1e-4)
