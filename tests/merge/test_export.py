"""``moa.export_mixture``: a routed mixture frozen into one static adapter, PEFT-loadable."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.errors import RoutingError
from moa.merge import MergeError, average_routing, export_mixture
from moa.routing.decision import RoutingDecision


class ParityRouter(moa.Router):
    """Rows whose first token is even go to ``{a: .8, b: .2}``, odd ones to ``{b: 1}``."""

    name = "parity_test"

    def route(self, request):
        rows = [{"a": 0.8, "b": 0.2} if int(t) % 2 == 0 else {"b": 1.0} for t in request.input_ids[:, 0]]
        return RoutingDecision.from_mixtures(rows, request.adapter_names)


@pytest.fixture
def model(tiny_model):
    for name, seed, r in (("a", 1, 4), ("b", 2, 6)):
        torch.manual_seed(seed)
        tiny_model.add_adapter(name, moa.LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    return tiny_model


@pytest.fixture
def prompts():
    ids = torch.randint(0, 256, (6, 5), generator=torch.Generator().manual_seed(4))
    ids[:, 0] = torch.tensor([2, 4, 6, 1, 8, 3])  # 4 even rows, 2 odd rows
    return ids


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def test_average_routing_is_the_mean_decision_over_prompts(model, prompts):
    model.set_router(ParityRouter())
    average = average_routing(model, prompts)
    assert average == pytest.approx({"a": 0.8 * 4 / 6, "b": (0.2 * 4 + 2) / 6})


def test_cat_export_is_exact_and_loads_in_peft(model, prompts, input_ids, tmp_path, tiny_base_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    router = ParityRouter()
    out = export_mixture(model, router=router, prompts=prompts, method="cat", new_name="static",
                         save_to=tmp_path / "static")
    assert model.router is None  # the router given here was set only for the export
    assert out.weights == pytest.approx({"a": 0.8 * 4 / 6, "b": (0.2 * 4 + 2) / 6})
    ranks = {layer.rank for layer in model.adapter_layers("static").values()}
    assert ranks == {10}  # 4 + 6: exact
    expected = logits(model, input_ids, adapter_weights=out.weights)
    assert torch.allclose(logits(model, input_ids, adapter_names=["static"] * 4), expected, atol=1e-5, rtol=0)
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base_dir).eval(), out.path)
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids).logits, expected, atol=1e-5, rtol=0)


def test_svd_export_at_a_chosen_rank_from_given_weights(model, input_ids):
    weights = {"a": 0.3, "b": 0.7}
    out = export_mixture(model, weights=weights, method="svd", rank=3, new_name="small")
    assert out.method == "svd" and out.path is None
    assert {layer.rank for layer in model.adapter_layers("small").values()} == {3}
    full = export_mixture(model, weights=weights, method="svd", new_name="full")  # default rank: exact
    expected = logits(model, input_ids, adapter_weights=weights)
    assert torch.allclose(logits(model, input_ids, adapter_names=["full"] * 4), expected, atol=1e-5, rtol=0)
    assert full.adapter_name == "full"


def test_the_models_own_router_is_used_when_none_is_given(model, prompts):
    model.set_router(ParityRouter())
    out = export_mixture(model, prompts=prompts, new_name="own")
    assert out.weights["a"] == pytest.approx(0.8 * 4 / 6)


def test_export_errors(model, prompts):
    with pytest.raises(RoutingError, match="needs a router"):
        export_mixture(model, prompts=prompts)
    with pytest.raises(MergeError, match="either weights"):
        export_mixture(model, weights={"a": 1.0}, prompts=prompts)
    with pytest.raises(MergeError, match="either weights"):
        export_mixture(model)
    with pytest.raises(MergeError, match="Unknown export method 'ties'"):
        export_mixture(model, weights={"a": 1.0}, method="ties")
    with pytest.raises(MergeError, match="only with method='svd'"):
        export_mixture(model, weights={"a": 1.0}, rank=2)
    with pytest.raises(MergeError, match="empty"):
        export_mixture(model, weights={"a": 0.0})
    assert model.adapter_names == ["a", "b"]
