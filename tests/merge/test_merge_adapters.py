"""``moa.merge_adapters``: a new adapter in the bank, correct forward, PEFT format, clean errors."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.errors import AdapterExistsError, UnknownAdapterError, UnknownPluginError
from moa.merge import MergeError
from moa.merge import strategies as S


def add(model, name, r, alpha, seed, targets=("q_proj", "v_proj"), **kwargs):
    torch.manual_seed(seed)
    model.add_adapter(name, moa.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                           init_lora_weights=False, **kwargs))


@pytest.fixture
def model(tiny_model):
    """Three adapters of ranks 4 / 8 / 2 on overlapping modules (c has an alpha_pattern)."""
    add(tiny_model, "a", 4, 8, 1)
    add(tiny_model, "b", 8, 4, 2, targets=("q_proj", "k_proj"), use_rslora=True)
    add(tiny_model, "c", 2, 2, 3, targets=("v_proj", "down_proj"), alpha_pattern={"down_proj": 6})
    return tiny_model


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def snapshot(model):
    return (list(model.adapter_names), dict(model.peft_config),
            {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point})


@pytest.mark.parametrize("strategy", ["cat", "linear", "svd"])
def test_exact_strategies_reproduce_the_mixture_forward(model, input_ids, strategy):
    weights = {"a": 0.6, "b": 0.25, "c": 0.8}
    name = moa.merge_adapters(model, list(weights), list(weights.values()), strategy, "both")
    assert name == "both" and model.adapter_names[-1] == "both"
    expected = logits(model, input_ids, adapter_weights=weights)
    merged = logits(model, input_ids, adapter_names=["both"] * input_ids.shape[0])
    assert torch.allclose(merged, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, logits(model, input_ids, adapter_names=[None] * input_ids.shape[0]))


def test_merged_adapter_ranks_config_and_peft_round_trip(model, input_ids, tmp_path, tiny_base_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    moa.merge_adapters(model, ["a", "b", "c"], [0.5, 0.3, 0.2], "cat", "both")
    config = model.peft_config["both"]
    ranks = {m: layer.rank for m, layer in model.adapter_layers("both").items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 12  # a + b
    assert ranks["model.layers.0.self_attn.v_proj"] == 6  # a + c
    assert ranks["model.layers.0.mlp.down_proj"] == 2 and ranks["model.layers.0.self_attn.k_proj"] == 8
    assert not config.use_rslora and all(layer.scale == 1.0 for layer in model.adapter_layers("both").values())
    model.save_adapter("both", tmp_path / "both")
    expected = logits(model, input_ids, adapter_names=["both"] * input_ids.shape[0])
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval(), tmp_path / "both")
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids).logits, expected, atol=1e-5, rtol=0)
    model.load_adapter(tmp_path / "both", adapter_name="reloaded")
    assert torch.allclose(logits(model, input_ids, adapter_names=["reloaded"] * 4), expected, atol=1e-6, rtol=0)


def test_rank_and_density_options_reach_the_strategy(model):
    moa.merge_adapters(model, ["a", "c"], [0.5, 0.5], "ties_svd", "t", rank=3, density=0.4)
    assert {layer.rank for layer in model.adapter_layers("t").values()} == {3}
    moa.merge_adapters(model, ["a", "c"], [0.5, 0.5], "ties", "full", density=0.4)
    full = model.adapter_layers("full")["model.layers.0.self_attn.v_proj"]
    assert full.rank == 32  # exact TIES is full rank: min(in=64, out=32)


def test_same_seed_same_dare_adapter_other_seed_differs(model):
    for name, seed in (("d1", 3), ("d2", 3), ("d3", 4)):
        moa.merge_adapters(model, ["a", "c"], [0.5, 0.5], "dare_linear", name, density=0.5, seed=seed)
    delta = {n: model.adapter_layers(n)["model.layers.1.self_attn.v_proj"].delta_weight() for n in ("d1", "d2", "d3")}
    assert torch.equal(delta["d1"], delta["d2"]) and not torch.allclose(delta["d1"], delta["d3"])


def test_default_weights_are_the_average(model, input_ids):
    moa.merge_adapters(model, ["a", "c"], strategy="linear", new_name="avg")
    expected = logits(model, input_ids, adapter_weights={"a": 0.5, "c": 0.5})
    assert torch.allclose(logits(model, input_ids, adapter_names=["avg"] * 4), expected, atol=1e-5, rtol=0)


def test_builtin_strategies_are_registered_through_the_plugin_hook():
    from moa.plugin import get_merge_strategy

    for name, (function, _) in S.BUILTIN_STRATEGIES.items():
        spec = get_merge_strategy(name)
        assert spec.function is function and spec.description


def test_a_custom_strategy_function_with_the_documented_signature(model, input_ids):
    def first_only(lora_a, lora_b, weights, *, rank=None, density=None, majority_sign_method="total",
                   generator=None):
        return weights[0] * lora_a[0], lora_b[0]

    moa.merge_adapters(model, ["a"], [0.7], first_only, "first")
    expected = logits(model, input_ids, adapter_weights={"a": 0.7})
    assert torch.allclose(logits(model, input_ids, adapter_names=["first"] * 4), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"names": ["a", "nope"]}, UnknownAdapterError, "No adapter named 'nope'"),
        ({"names": "a"}, MergeError, "non-empty list of adapter names"),
        ({"names": ["a", "a"]}, MergeError, "more than once"),
        ({"weights": [0.5]}, MergeError, "one number per adapter"),
        ({"weights": [0.5, float("nan")]}, MergeError, "not a finite number"),
        ({"strategy": "tie"}, UnknownPluginError, "Unknown merge strategy 'tie'"),
        ({"new_name": "a"}, AdapterExistsError, "already loaded"),
        ({"new_name": "bad name"}, AdapterExistsError, "Invalid adapter name"),
        ({"strategy": "ties"}, MergeError, "needs density"),
        ({"strategy": "ties", "density": 0.5, "majority_sign_method": "most"}, MergeError, "majority_sign_method"),
        ({"rank": -1}, MergeError, "positive integer"),
        ({"strategy": "svd", "rank": 300}, MergeError, "above this model's max_rank=256"),
        ({"strategy": "cat", "rank": 3}, MergeError, "'cat' produces rank"),
        ({"strategy": lambda *a, **k: (torch.zeros(2, 3), torch.zeros(3, 2))}, MergeError, "must return"),
        ({"strategy": lambda *a, **k: 1 / 0}, MergeError, "raised ZeroDivisionError"),
    ],
)
def test_bad_requests_raise_and_leave_the_model_unchanged(model, kwargs, error, match):
    call = {"names": ["a", "c"], "weights": [0.5, 0.5], "strategy": "linear", "new_name": "m", **kwargs}
    before = snapshot(model)
    with pytest.raises(error, match=match):
        moa.merge_adapters(model, call.pop("names"), call.pop("weights"), call.pop("strategy"), call.pop("new_name"),
                           **call)
    after = snapshot(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert after[2].keys() == before[2].keys() and all(torch.equal(after[2][k], before[2][k]) for k in before[2])


def test_full_rank_strategy_above_the_cap_suggests_the_svd_variant(tiny_base_dir):
    from transformers import LlamaForCausalLM

    small = moa.MixtureModel(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval(), max_rank=16)
    add(small, "a", 4, 8, 1)
    add(small, "b", 4, 8, 2)
    with pytest.raises(MergeError, match="Use 'ties_svd' with rank="):
        moa.merge_adapters(small, ["a", "b"], [0.5, 0.5], "ties", "t", density=0.5)
    assert small.adapter_names == ["a", "b"]
