"""Training the learned gate: on labels (cached features) and end to end through the LM loss."""

from __future__ import annotations

import torch

from moa.routing.learned_gate import LearnedGate
from moa.data.chat import encode_sft_example, pad_batch
from moa.train.recipes import DEFAULT_HIDDEN_LAYER
from moa.train.router import collect_features, token_counts, train_gate_lm, train_router
from tests.train.helpers import TOY_DOMAINS, add_random_adapters, toy_examples


def test_labels_mode_learns_the_toy_domains(tiny_chat_model, tmp_path):
    model = tiny_chat_model
    add_random_adapters(model)  # on the default gate layer (2) and above
    gate, metrics = train_router(model, toy_examples(10), list(TOY_DOMAINS),  # default hidden_layer
                                 dev_examples=toy_examples(5, seed=3), progress=False)
    assert gate.hidden_layer == DEFAULT_HIDDEN_LAYER
    assert metrics["train_accuracy"] == 1.0 and metrics["dev_accuracy"] >= 0.8
    assert gate.metadata["base_fingerprint"] == model.base_fingerprint
    gate.save(tmp_path / "gate")
    model.set_router(LearnedGate.load(tmp_path / "gate"))
    routed = model.route(torch.tensor([[5, 6, 7]]))
    assert len(routed) == 1 and abs(sum(routed[0].values()) - 1) < 1e-6


def test_token_level_features_and_training(tiny_chat_model):
    model = tiny_chat_model
    add_random_adapters(model)
    examples = toy_examples(4)
    prompts = [e.prompt for e in examples]
    features = collect_features(model, prompts, DEFAULT_HIDDEN_LAYER, level="token")
    assert features.shape == (sum(token_counts(model, prompts)), model.config.hidden_size)
    gate, metrics = train_router(model, examples, list(TOY_DOMAINS), level="token", progress=False, top_k=2)
    assert gate.level == "token" and metrics["train_rows"] == features.shape[0]
    model.set_router(gate)
    out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=2, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 6)


def test_lm_mode_moves_the_gate_with_adapters_frozen(tiny_chat_model):
    model = tiny_chat_model
    add_random_adapters(model)
    for name in TOY_DOMAINS:
        for layer in model.adapter_layers(name).values():
            layer.requires_grad_(False)
    adapters_before = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}
    torch.manual_seed(0)
    gate = LearnedGate(list(TOY_DOMAINS), model.config.hidden_size, dropout=0.0)  # default hidden_layer
    layer = gate.hidden_layer
    examples = toy_examples(6)

    # gradients reach the gate through RoutingDecision.weights
    gate.head.set_normalization(collect_features(model, [e.prompt for e in examples], layer))
    enc = [encode_sft_example(model.tokenizer, e.prompt, e.answer) for e in examples[:4]]
    batch = pad_batch([x[0] for x in enc], model.tokenizer.pad_token_id, labels=[x[1] for x in enc])
    features = collect_features(model, [e.prompt for e in examples[:4]], layer)
    decision = gate.decision_from_features(features, model.adapter_names, top_k=2)
    assert decision.weights.requires_grad
    model(**batch, use_cache=False, routing_decision=decision, adapters_from_layer=layer).loss.backward()
    grads = [p.grad for p in gate.head.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    gate.head.zero_grad(set_to_none=True)

    metrics = train_gate_lm(model, gate, examples, steps=4, batch_size=4, lr=1e-2, progress=False)
    assert metrics["weight_change_l1"] > 0 and len(metrics["loss_curve"]) == 4
    for k, v in model.state_dict().items():
        if k in adapters_before:
            assert torch.equal(v, adapters_before[k]), k
    assert not any(p.requires_grad for name in TOY_DOMAINS for layer in model.adapter_layers(name).values()
                   for p in layer.parameters())


def test_lm_mode_on_trainer_checkpoints_only_the_gate_and_resumes(tiny_chat_model, tmp_path):
    from safetensors.torch import load_file

    from moa.train.trainer import TRAINABLE_NAME

    model = tiny_chat_model
    add_random_adapters(model)
    torch.manual_seed(0)
    gate = LearnedGate(list(TOY_DOMAINS), model.config.hidden_size, dropout=0.0)
    options = {"batch_size": 2, "lr": 1e-2, "progress": False, "gradient_accumulation_steps": 2,
               "checkpoint_dir": tmp_path / "ckpt", "save_steps": 2}
    first = train_gate_lm(model, gate, toy_examples(4), steps=2, **options)
    saved = load_file(tmp_path / "ckpt" / "checkpoint-2" / TRAINABLE_NAME)
    assert saved and all(k.startswith("gate.") for k in saved)  # never the base or the adapters
    resumed = train_gate_lm(model, gate, toy_examples(4), steps=3, resume=True, **options)
    assert len(first["loss_curve"]) == 2 and len(resumed["loss_curve"]) == 1 and resumed["trainer"] == \
        "transformers.Trainer"
