"""MixtureModel on a tiny random Llama: mixed batches, routing sources, the adapter bank."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import moa
from moa.errors import AdapterExistsError, RoutingError, TargetModuleError, UnknownAdapterError

ADAPTERS = {
    # name: (config kwargs); different ranks and different target modules
    "a": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "b": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "c": dict(r=16, lora_alpha=4, target_modules=r".*\.mlp\.(up|down)_proj", use_rslora=True),
}


def add_random_adapters(model, names=("a", "b", "c")):
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        model.add_adapter(name, moa.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))


def merged_reference(model, mixture):
    """An independent reference: a copy of the base with sum_j w_j * scale_j * B_j A_j merged in."""
    reference = copy.deepcopy(model.base_model)
    for layer in list(reference.modules()):
        if isinstance(layer, moa.MixtureLinear):
            weight = layer.base_layer.weight.detach().double().clone()
            for name, w in (mixture or {}).items():
                if name in layer.adapters:
                    a, b, scale = layer.adapters[name].low_rank()
                    weight += w * scale * (b.double() @ a.double())
            layer.base_layer.weight.data = weight.float()
            layer.adapters = torch.nn.ModuleDict()
    return reference


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def test_per_row_names_equal_merged_reference(tiny_model, input_ids):
    add_random_adapters(tiny_model)
    rows = ["a", None, "c", "b"]
    mixed = logits(tiny_model, input_ids, adapter_names=rows)
    for i, name in enumerate(rows):
        ref = merged_reference(tiny_model, {name: 1.0} if name else None)
        with torch.no_grad():
            expected = ref(input_ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-5, atol=1e-5)
        alone = logits(tiny_model, input_ids[i : i + 1], adapter_names=[name])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_weighted_mixtures_k1_to_k3_equal_merged_reference(tiny_model, input_ids):
    add_random_adapters(tiny_model)
    rows = [{"a": 0.7, "b": 0.3}, {"c": 1.5}, {"a": 0.2, "b": 0.5, "c": 0.9}, None]
    mixed = logits(tiny_model, input_ids, adapter_weights=rows)
    for i, mixture in enumerate(rows):
        with torch.no_grad():
            expected = merged_reference(tiny_model, mixture)(input_ids[i : i + 1]).logits
        torch.testing.assert_close(mixed[i : i + 1], expected, rtol=1e-5, atol=1e-5)
    # and the adapters really change the output (the test could fail)
    base = logits(tiny_model, input_ids, adapter_names=[None] * 4)
    assert (mixed[:3] - base[:3]).abs().max() > 1e-2


def test_set_adapter_list_sums_adapters_and_default_routing(tiny_model, input_ids):
    add_random_adapters(tiny_model)
    assert tiny_model.active_adapters == ["a"]  # the first adapter becomes active, as in PEFT
    torch.testing.assert_close(logits(tiny_model, input_ids), logits(tiny_model, input_ids, adapter_names=["a"] * 4))
    tiny_model.set_adapter(["b", "c"])
    torch.testing.assert_close(
        logits(tiny_model, input_ids), logits(tiny_model, input_ids, adapter_weights={"b": 1.0, "c": 1.0})
    )


def test_disable_adapters_runs_base(tiny_model, input_ids):
    base = logits(tiny_model, input_ids)
    add_random_adapters(tiny_model)
    with tiny_model.disable_adapters():
        torch.testing.assert_close(logits(tiny_model, input_ids, adapter_names=["a", "b", "c", "a"]), base)
    assert not torch.allclose(logits(tiny_model, input_ids), base)


def test_delete_adapter_keeps_the_others_exact(tiny_model, input_ids):
    add_random_adapters(tiny_model)
    before = logits(tiny_model, input_ids, adapter_names=["c", "b", None, "c"])
    tiny_model.delete_adapter("a")
    assert tiny_model.adapter_names == ["b", "c"]
    assert tiny_model.active_adapters == []
    after = logits(tiny_model, input_ids, adapter_names=["c", "b", None, "c"])
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(UnknownAdapterError):
        logits(tiny_model, input_ids, adapter_names=["a", None, None, None])


def test_generate_per_row_equals_alone_with_kv_cache(tiny_model):
    add_random_adapters(tiny_model)
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(7))
    rows = ["c", "a", None]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    together = tiny_model.generate(prompt, adapter_names=rows, use_cache=True, **kw)
    no_cache = tiny_model.generate(prompt, adapter_names=rows, use_cache=False, **kw)
    assert torch.equal(together, no_cache)
    for i, name in enumerate(rows):
        alone = tiny_model.generate(prompt[i : i + 1], adapter_names=[name], **kw)
        assert torch.equal(together[i : i + 1], alone)
    plain = tiny_model.generate(prompt, adapter_names=[None] * 3, **kw)
    assert not torch.equal(together[:2], plain[:2])  # adapters changed what was generated


def test_generate_weighted_mixture_with_beams(tiny_model):
    add_random_adapters(tiny_model)
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(3))
    rows = [{"a": 0.5, "c": 0.5}, {"b": 1.0}]
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)
    together = tiny_model.generate(prompt, adapter_weights=rows, **kw)
    for i in range(2):
        alone = tiny_model.generate(prompt[i : i + 1], adapter_weights=[rows[i]], **kw)
        assert torch.equal(together[i : i + 1], alone)


def test_fixed_router_routes_rows_without_names(tiny_model, input_ids):
    add_random_adapters(tiny_model)
    tiny_model.set_router(moa.FixedRouter({"b": 0.4, "c": 0.6}))
    torch.testing.assert_close(
        logits(tiny_model, input_ids), logits(tiny_model, input_ids, adapter_weights={"b": 0.4, "c": 0.6})
    )
    assert tiny_model.route(input_ids[:2]) == [{"b": pytest.approx(0.4), "c": pytest.approx(0.6)}] * 2
    with pytest.raises(RoutingError, match="moa.Router"):
        tiny_model.set_router("fixed")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(adapter_weights=[{"a": -1.0}] * 4), RoutingError, "non-negative"),
        (dict(adapter_weights=[{"a": math.nan}] * 4), RoutingError, "finite"),
        (dict(adapter_weights=[{"zzz": 1.0}] * 4), UnknownAdapterError, "Loaded: a, b, c"),
        (dict(adapter_names=["a", "b"]), RoutingError, "2 entries but the batch has 4"),
        (dict(adapter_names="a"), RoutingError, "one entry per row"),
        (dict(adapter_names=["a"] * 4, adapter_weights=[None] * 4), RoutingError, "not both"),
    ],
)
def test_bad_routing_input_raises_and_changes_nothing(tiny_model, input_ids, kwargs, error, match):
    add_random_adapters(tiny_model)
    before = logits(tiny_model, input_ids)
    with pytest.raises(error, match=match):
        logits(tiny_model, input_ids, **kwargs)
    assert tiny_model.adapter_names == ["a", "b", "c"]
    torch.testing.assert_close(logits(tiny_model, input_ids), before, rtol=0, atol=0)


def test_set_adapter_unknown_lists_loaded_names(tiny_model):
    add_random_adapters(tiny_model)
    with pytest.raises(UnknownAdapterError, match=r"No adapter named 'sql'\. Loaded: a, b, c"):
        tiny_model.set_adapter("sql")
    with pytest.raises(KeyError):  # still a KeyError for code that catches builtins
        tiny_model.set_adapter(["a", "sql"])
    assert tiny_model.active_adapters == ["a"]


def test_add_adapter_errors_leave_model_untouched(tiny_model, input_ids):
    add_random_adapters(tiny_model, names=("a",))
    before = logits(tiny_model, input_ids)
    with pytest.raises(TargetModuleError, match="matches no linear layer"):
        tiny_model.add_adapter("x", moa.LoraConfig(target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(AdapterExistsError, match="already loaded"):
        tiny_model.add_adapter("a", moa.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterExistsError, match="torch module attribute"):
        tiny_model.add_adapter("train", moa.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AdapterExistsError, match="letters, digits"):
        tiny_model.add_adapter("a.b", moa.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(moa.MoaError, match="max_rank=256"):
        tiny_model.add_adapter("big", moa.LoraConfig(r=300, target_modules=["q_proj"]))
    assert tiny_model.adapter_names == ["a"]
    torch.testing.assert_close(logits(tiny_model, input_ids), before, rtol=0, atol=0)


def test_zero_initialised_adapter_is_identity_and_trainable(tiny_model, input_ids):
    base = logits(tiny_model, input_ids)
    tiny_model.add_adapter("new", moa.LoraConfig(r=4, target_modules="all-linear"))
    torch.testing.assert_close(logits(tiny_model, input_ids), base, rtol=0, atol=0)
    trainable, total = tiny_model.get_nb_trainable_parameters()
    # 4 layers x (q,k,v,o,gate,up,down); A is r x in, B is out x r
    expected = 4 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert trainable == expected and total > trainable
    out = tiny_model(input_ids, adapter_names=["new", None, "new", None], labels=input_ids)
    out.loss.backward()
    grads = [p.grad for n, p in tiny_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for n, p in tiny_model.named_parameters() if "lora_B" in n for g in [p.grad])
    assert all(p.grad is None for n, p in tiny_model.named_parameters() if "lora" not in n)


def test_mixed_batch_on_nf4_base_equals_rows_alone(tiny_base_dir, input_ids):
    from moa.model.base_loading import load_base

    base, _ = load_base(tiny_base_dir, quantization="nf4")
    model = moa.MixtureModel(base)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    add_random_adapters(model)
    rows = [{"a": 0.5, "b": 0.5}, "c", None, {"a": 0.2, "b": 0.3, "c": 0.5}]
    mixtures = [r if isinstance(r, dict) or r is None else {r: 1.0} for r in rows]
    mixed = logits(model, input_ids, adapter_weights=mixtures)
    for i, mixture in enumerate(mixtures):
        alone = logits(model, input_ids[i : i + 1], adapter_weights=[mixture])
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    base_rows = logits(model, input_ids, adapter_names=[None] * 4)
    assert (mixed[[0, 1, 3]] - base_rows[[0, 1, 3]]).abs().max() > 1e-2
