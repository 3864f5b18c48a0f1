"""Any mix of rows in one call: named, weighted, base and router-decided rows share a batch.

The reference for every row is the same row run alone (fp32, exact up to float noise);
the learned gate, at its default hidden layer on the 4-layer tiny model, decides only the
rows that ask for it.
"""

from __future__ import annotations

import pytest
import torch

import moa
from moa.errors import RoutingError
from moa.routing.learned_gate import LearnedGate
from moa.testing.fixtures import make_tiny_model, random_input_ids

WEIGHTED = {"a": 0.5, "b": 0.3, "c": 0.2}  # k=3 over ranks 4, 8 and 16


class RecordingGate(LearnedGate):
    """The learned gate, recording the hidden-state shapes it was asked about."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, ...]] = []

    def route(self, request):
        self.seen.append(tuple(request.hidden_states.shape))
        return super().route(request)


def build(level: str = "sequence") -> tuple[moa.MixtureModel, RecordingGate]:
    model = make_tiny_model(seed=0)
    for name, rank, target, seed in (("a", 4, "all-linear", 1), ("b", 8, ["q_proj", "v_proj"], 2),
                                     ("c", 16, ["up_proj", "down_proj", "o_proj"], 3)):
        torch.manual_seed(seed)
        model.add_adapter(name, moa.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target,
                                               init_lora_weights=False))
    torch.manual_seed(4)
    gate = RecordingGate(["a", "b", "c"], hidden_size=64, level=level, top_k=2)  # default hidden_layer=2
    model.set_router(gate)
    return model, gate


@pytest.fixture(scope="module")
def model_and_gate():
    return build()


def rows_alone(model, ids, requests):
    """Each row's logits, run alone with its own request."""
    out = []
    for i, request in enumerate(requests):
        row = ids[i : i + 1]
        if request == "auto":
            out.append(model(row).logits)  # the router decides every row of a call naming none
        elif isinstance(request, dict):
            out.append(model(row, adapter_weights=[request]).logits)
        else:
            out.append(model(row, adapter_names=[request]).logits)
    return torch.cat(out)


@torch.no_grad()
def test_named_weighted_base_and_routed_rows_in_one_batch_equal_each_row_alone(model_and_gate):
    model, gate = model_and_gate
    ids = random_input_ids(batch=4, seq_len=9, seed=11)
    requests = ["a", WEIGHTED, None, "auto"]
    gate.seen.clear()
    mixed = model(ids, adapter_weights=[{"a": 1.0}, WEIGHTED, None, "auto"]).logits
    assert gate.seen == [(1, 9, 64)]  # the gate decided the routed row only, in the same pass
    alone = rows_alone(model, ids, requests)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    # the same batch spelled with adapter_names / adapter_weights gives the same rows
    by_names = model(ids[[0, 2, 3]], adapter_names=["a", "__base__", "auto"]).logits
    torch.testing.assert_close(by_names, alone[[0, 2, 3]], rtol=1e-5, atol=1e-5)
    # and every row really differs from the base (nothing silently dropped)
    with model.disable_adapter():
        base = model(ids).logits
    assert torch.equal(base[2], mixed[2])
    for row in (0, 1, 3):
        assert not torch.allclose(base[row], mixed[row], atol=1e-4), row


@torch.no_grad()
def test_explicit_rows_use_their_adapters_below_the_gate_layer(model_and_gate):
    """A named row next to a routed row keeps adapters on layers < hidden_layer, as alone."""
    model, _ = model_and_gate
    ids = random_input_ids(batch=2, seq_len=6, seed=3)
    mixed = model(ids, adapter_names=["a", "auto"]).logits[0]
    alone = model(ids[:1], adapter_names=["a"]).logits[0]
    from_layer_2 = model(ids[:1], routing_decision=moa.RoutingDecision.from_names(["a"], model.adapter_names),
                         adapters_from_layer=2).logits[0]
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed, from_layer_2, atol=1e-4)


@torch.no_grad()
def test_generate_mixed_rows_equal_each_row_alone(model_and_gate):
    model, gate = model_and_gate
    ids = random_input_ids(batch=4, seq_len=5, seed=12)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=257)
    requests = ["c", WEIGHTED, None, "auto"]
    gate.seen.clear()
    mixed = model.generate(ids, adapter_weights=[{"c": 1.0}, WEIGHTED, None, "auto"], **kw)
    assert gate.seen == [(1, 5, 64)]  # decided once, at the prompt; kept for every new token
    for i, request in enumerate(requests):
        row = ids[i : i + 1]
        if request == "auto":
            alone = model.generate(row, **kw)
        elif isinstance(request, dict):
            alone = model.generate(row, adapter_weights=[request], **kw)
        else:
            alone = model.generate(row, adapter_names=[request], **kw)
        assert torch.equal(mixed[i : i + 1], alone), i


@torch.no_grad()
def test_generate_with_beams_keeps_each_rows_decision(model_and_gate):
    model, _ = model_and_gate
    ids = random_input_ids(batch=2, seq_len=5, seed=13)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=257)
    mixed = model.generate(ids, adapter_names=["b", "auto"], **kw)
    assert torch.equal(mixed[:1], model.generate(ids[:1], adapter_names=["b"], **kw))
    assert torch.equal(mixed[1:], model.generate(ids[1:], **kw))


@torch.no_grad()
def test_token_level_gate_routes_only_its_rows():
    model, gate = build(level="token")
    ids = random_input_ids(batch=3, seq_len=7, seed=14)
    mixed = model(ids, adapter_names=["auto", "b", "auto"]).logits
    assert gate.seen == [(2, 7, 64)]
    torch.testing.assert_close(mixed[0], model(ids[:1]).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], model(ids[1:2], adapter_names=["b"]).logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], model(ids[2:]).logits[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_route_reports_explicit_rows_and_asks_the_router_only_for_auto_rows(model_and_gate):
    model, gate = model_and_gate
    ids = random_input_ids(batch=4, seq_len=6, seed=15)
    gate.seen.clear()
    rows = model.route(ids, adapter_weights=[WEIGHTED, "auto", None, "auto"])
    assert gate.seen == [(2, 6, 64)]
    assert rows[0] == pytest.approx(WEIGHTED) and rows[2] == {}
    assert rows[1] == pytest.approx(model.route(ids[1:2])[0])
    assert rows[3] == pytest.approx(model.route(ids[3:4])[0])
    assert all(abs(sum(r.values()) - 1) < 1e-6 for r in (rows[1], rows[3]))


@torch.no_grad()
def test_per_call_router_overrides_the_models():
    model, gate = build()
    ids = random_input_ids(batch=2, seq_len=6, seed=16)
    with_gate = model(ids, adapter_names=["a", "auto"]).logits
    model.set_router(None)
    with pytest.raises(RoutingError, match="no router is set"):
        model(ids, adapter_names=["a", "auto"])
    assert torch.equal(model(ids, adapter_names=["a", "auto"], router=gate).logits, with_gate)
    fixed = moa.FixedRouter({"c": 1.0})
    torch.testing.assert_close(model(ids, adapter_names=["a", "auto"], router=fixed).logits[1],
                               model(ids[1:], adapter_names=["c"]).logits[0], rtol=1e-5, atol=1e-5)
    assert model.router is None  # the override lasted one call


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(adapter_names=["a", 3]), "adapter_names\\[1\\]"),
        (dict(adapter_weights=[{"a": 1.0}, "automatic"]), "adapter_weights\\[1\\]"),
        (dict(adapter_weights="auto"), "one entry per row"),
        (dict(router=object()), "moa.Router instance"),
    ],
)
def test_bad_row_requests_say_what_is_wrong(model_and_gate, kwargs, match):
    model, _ = model_and_gate
    with pytest.raises(RoutingError, match=match):
        model(random_input_ids(batch=2, seq_len=4), **kwargs)


def test_auto_and_base_are_reserved_adapter_names(model_and_gate):
    model, _ = model_and_gate
    for name in ("auto", "__base__"):
        with pytest.raises(moa.MoaError, match="reserved"):
            model.add_adapter(name, moa.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.adapter_names == ["a", "b", "c"]
