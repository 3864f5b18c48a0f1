"""Routers that decide from the base's hidden states inside the same forward."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.errors import RoutingError
from tests.model.test_mixture_model import merged_reference


class SignRouter(moa.Router):
    """Row -> 0.7 'a' + 0.3 'b' if its pooled hidden state at layer 1 is above the batch median, else 'b'."""

    name = "sign"
    hidden_layer = 1

    def __init__(self):
        self.calls = 0
        self.seen_shapes = []

    def route(self, request):
        self.calls += 1
        self.seen_shapes.append(tuple(request.hidden_states.shape))
        pooled = request.hidden_states.mean(dim=(1, 2))
        threshold = float(pooled.median()) if len(pooled) > 1 else 0.0
        mixtures = [{"a": 0.7, "b": 0.3} if float(v) > threshold else {"b": 1.0} for v in pooled]
        return moa.RoutingDecision.from_mixtures(mixtures, request.adapter_names)


class TokenRouter(SignRouter):
    """Per token: 'a' if the token's hidden mean is positive, else 'b'."""

    level = "token"

    def route(self, request):
        self.calls += 1
        h = request.hidden_states
        per_token = h.mean(dim=2).reshape(-1)
        threshold = float(per_token.median()) if len(per_token) > 1 else 0.0
        mixtures = [{"a": 1.0} if float(v) > threshold else {"b": 1.0} for v in per_token]
        decision = moa.RoutingDecision.from_mixtures(mixtures, request.adapter_names)
        return moa.RoutingDecision(decision.ids, decision.weights, level="token")


def add(model, name, target, seed):
    torch.manual_seed(seed)
    model.add_adapter(name, moa.LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False))


@pytest.fixture
def routed(tiny_model):
    # adapters only on layer 1 (>= hidden_layer): routing in-pass loses nothing
    add(tiny_model, "a", r"model\.layers\.1\..*_proj", 0)
    add(tiny_model, "b", r"model\.layers\.1\.self_attn\..*", 1)
    router = SignRouter()
    tiny_model.set_router(router)
    return tiny_model, router


def test_in_pass_routing_equals_explicit_mixture_of_the_same_decision(routed, input_ids):
    model, router = routed
    mixtures = model.route(input_ids)  # partial pass: the router's view of each row
    assert router.calls == 1 and router.seen_shapes == [(4, 7, 64)]
    assert {frozenset(m) for m in mixtures} == {frozenset({"a", "b"}), frozenset({"b"})}  # both branches hit
    with torch.no_grad():
        routed_logits = model(input_ids).logits
        explicit = model(input_ids, adapter_weights=mixtures).logits
    assert router.calls == 2  # exactly one decision for the routed forward
    torch.testing.assert_close(routed_logits, explicit, rtol=1e-5, atol=1e-5)


def test_layers_before_the_routing_layer_run_the_base(routed, input_ids):
    model, router = routed
    add(model, "early", r"model\.layers\.0\.mlp\..*", 2)  # touches layer 0 < hidden_layer
    model.set_router(moa.FixedRouter({"early": 1.0, "a": 0.5}))
    fixed = model(input_ids).logits.detach()  # FixedRouter has no hidden_layer: all layers

    class EarlyRouter(SignRouter):
        def route(self, request):
            return moa.RoutingDecision.from_mixtures([{"early": 1.0, "a": 0.5}] * 4, request.adapter_names)

    model.set_router(EarlyRouter())
    with torch.no_grad():
        in_pass = model(input_ids).logits
        expected = merged_reference(model, {"a": 0.5})(input_ids).logits  # 'early' lives only below layer 1
    torch.testing.assert_close(in_pass, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(in_pass, fixed, atol=1e-4)


def test_generate_decides_once_and_keeps_the_kv_cache(routed):
    model, router = routed
    prompt = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kw)
    assert router.calls == 1 and router.seen_shapes == [(3, 5, 64)]
    without_cache = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(with_cache, without_cache)
    explicit = model.generate(prompt, adapter_weights=model.route(prompt), **kw)
    assert torch.equal(with_cache, explicit)


def test_token_level_router_decides_each_new_token(tiny_model):
    add(tiny_model, "a", r"model\.layers\.1\..*_proj", 0)
    add(tiny_model, "b", r"model\.layers\.1\.self_attn\..*", 1)
    router = TokenRouter()
    tiny_model.set_router(router)
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(4))
    out = tiny_model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert router.calls == 3  # prefill + one per later step (cache on)
    assert out.shape == (2, 7)
    rows = tiny_model.route(prompt)
    assert all(abs(sum(r.values()) - 1.0) < 1e-6 for r in rows)


def test_hidden_layer_out_of_range_is_refused(tiny_model):
    add(tiny_model, "a", "all-linear", 0)
    router = SignRouter()
    router.hidden_layer = 4  # one past the last of the tiny base's 4 layers
    with pytest.raises(RoutingError, match=r"outside this base's decoder layers 0\.\.3"):
        tiny_model.set_router(router)
    assert tiny_model.router is None
