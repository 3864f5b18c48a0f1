"""Finite but huge weights: refused at load (adapters and routers), and non-finite logits never returned.

A float32 of 3e38 passes the NaN/infinity check and overflows in the first forward. moa bounds
each tensor's gain by its compute dtype (``moa.adapters.magnitude``) when a file is read, and
a call whose adapter rows still get NaN or infinite logits raises instead of returning them
(``moa.model.finite_logits``); ``moa serve`` fails that one request and keeps the others.
"""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import moa
from moa.adapters.magnitude import check_gain, gain_bound
from moa.errors import AdapterFormatError, NonFiniteOutputError, RoutingError
from moa.routing.learned_gate import LearnedGate
from moa.serve.engine import Engine
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
from moa.testing.fixtures import make_tiny_model, random_input_ids

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def model():
    torch.manual_seed(0)
    tiny = make_tiny_model()
    tiny.add_adapter("good", moa.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    return tiny


def saved_with(model, tmp_path, key_part: str, value: float):
    """The adapter "good" saved, then one value of its first tensor named like ``key_part`` set to ``value``."""
    folder = tmp_path / "adapter"
    model.save_adapter("good", folder)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = min(k for k in tensors if key_part in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder, key


@pytest.mark.parametrize(("key_part", "value"), [("lora_A", 3e38), ("lora_A", -1e12), ("lora_B", 1e9)])
def test_a_finite_but_huge_adapter_weight_is_refused_at_load_naming_file_tensor_and_value(model, tmp_path,
                                                                                          key_part, value):
    folder, key = saved_with(model, tmp_path, key_part, value)
    with pytest.raises(AdapterFormatError) as caught:
        model.load_adapter(folder, adapter_name="huge")
    message = str(caught.value)
    assert "adapter_model.safetensors" in message and repr(key) in message and f"{abs(value):.3g}" in message
    assert model.adapter_names == ["good"]  # nothing was loaded


def test_weights_of_a_trained_size_load(model, tmp_path):
    folder, _ = saved_with(model, tmp_path, "lora_B", 5.0)  # large for a LoRA, far below the bound
    model.load_adapter(folder, adapter_name="fine")
    assert model.adapter_names == ["good", "fine"]


def test_the_bound_is_the_dtypes_fourth_root_times_fan_in():
    assert gain_bound(torch.float32) == pytest.approx(float(torch.finfo(torch.float32).max) ** 0.25)
    weight = torch.zeros(4, 100)
    weight[0, 0] = gain_bound(torch.float32) / 100 * 0.99
    check_gain("w", weight, "f", dtype=torch.float32)  # just inside
    weight[0, 0] *= 1.02
    with pytest.raises(AdapterFormatError):
        check_gain("w", weight, "f", dtype=torch.float32)
    with pytest.raises(AdapterFormatError):  # the adapter's scale counts on the factor that carries it
        check_gain("w", torch.full((4, 100), 1.0), "f", dtype=torch.float32, scale=1e8)


def test_a_finite_but_huge_router_weight_is_refused_at_load(tmp_path):
    gate = LearnedGate(["a", "b"], hidden_size=16, hidden_layer=1)
    folder = gate.save(tmp_path / "gate")
    weights = next(folder.glob("*.safetensors"))
    tensors = load_file(weights)
    key = min(k for k, t in tensors.items() if t.dim() == 2)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 3e38
    save_file(tensors, weights)
    with pytest.raises(RoutingError) as caught:
        LearnedGate.load(folder)
    assert repr(key) in str(caught.value) and "3e+38" in str(caught.value)


def overflow(model, name):
    """Make adapter ``name`` overflow after loading (what no load check can see: weights edited in place)."""
    with torch.no_grad():
        for layer in model.adapter_layers(name).values():
            layer.lora_B.weight.fill_(3e38)  # finite, and NaN by the logits


def test_a_forward_whose_adapter_rows_overflow_raises_and_base_rows_do_not(model):
    ids = random_input_ids(3, 6)
    with torch.no_grad():
        expected = model(ids, adapter_names=[None, "good", None]).logits
    model.add_adapter("bad", moa.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    overflow(model, "bad")
    with torch.no_grad(), pytest.raises(NonFiniteOutputError, match=r"row\(s\) \[1\]"):
        model(ids, adapter_names=[None, "bad", "good"])
    with torch.no_grad():
        same = model(ids, adapter_names=[None, "good", None]).logits  # other calls are not affected
        assert torch.equal(same, expected)
        kept = model(ids, adapter_names=["bad", None, None], check_finite=False).logits  # the caller handles it
    assert not torch.isfinite(kept[0]).all() and torch.isfinite(kept[1:]).all()


def test_generate_raises_at_the_step_that_overflows(model):
    model.add_adapter("bad", moa.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    overflow(model, "bad")
    ids = random_input_ids(2, 5)
    with torch.no_grad(), pytest.raises(NonFiniteOutputError):
        model.generate(ids, adapter_names=["good", "bad"], max_new_tokens=3, do_sample=False, pad_token_id=257)
    with torch.no_grad():
        out = model.generate(ids, adapter_names=["good", None], max_new_tokens=3, do_sample=False, pad_token_id=257)
    assert out.shape == (2, 8)


def test_the_check_follows_each_threads_own_call(model):
    model.add_adapter("bad", moa.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    overflow(model, "bad")
    ids = random_input_ids(2, 6)
    with torch.no_grad():
        expected = model(ids, adapter_names=["good", None]).logits
    outcomes: dict[str, list] = {"good": [], "bad": []}

    def run(kind):
        for _ in range(10):
            try:
                with torch.no_grad():
                    names = ["good", None] if kind == "good" else [None, "bad"]
                    outcomes[kind].append(torch.equal(model(ids, adapter_names=names).logits, expected))
            except NonFiniteOutputError:
                outcomes[kind].append("raised")

    threads = [threading.Thread(target=run, args=(kind,)) for kind in ("good", "bad")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert outcomes == {"good": [True] * 10, "bad": ["raised"] * 10}


def test_the_server_fails_only_the_request_whose_logits_overflow(model):
    model.add_adapter("bad", moa.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    overflow(model, "bad")
    prompt = [5, 9, 13, 2, 7]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                  adapter_names=["good"], pad_token_id=257, eos_token_id=256)[0, 5:].tolist()
    engine = Engine(model, max_batch_size=4)
    engine.start()
    try:
        handles = [engine.submit(GenerationRequest(f"r{i}", prompt, RowRouting({name: 1.0}),
                                                   SamplingParams(max_tokens=4, temperature=0)))
                   for i, name in enumerate(["good", "bad", "good"])]
        results = []
        for handle in handles:
            try:
                results.append(handle.wait(60).token_ids)
            except NonFiniteOutputError as error:
                results.append(type(error).__name__)
        assert results == [expected, "NonFiniteOutputError", expected]
        assert engine.alive  # the engine goes on for everyone else
    finally:
        engine.shutdown()
