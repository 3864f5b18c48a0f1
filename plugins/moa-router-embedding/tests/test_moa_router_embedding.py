"""EmbeddingRouter: fitting, top-k/temperature, hidden states in the forward, persistence, contract."""

from __future__ import annotations

import json

import pytest
import torch

import moa
from moa.errors import RoutingError
from moa.routing import RoutingRequest
from moa.testing import RouterContract, require_plugin

embedding = require_plugin("moa-router-embedding", "moa_router_embedding")
EmbeddingRouter = embedding.EmbeddingRouter

EXAMPLES = {
    "alpha": ["SELECT id FROM users", "SELECT name FROM t WHERE x = 1", "SELECT count(*) FROM orders"],
    "beta": ["def f(x): return x", "def add(a, b): return a + b", "def main(): pass"],
    "gamma": ["12 + 7 = ?", "3 * 4 = ?", "100 - 1 = ?"],
}


class TestEmbeddingRouterContract(RouterContract):
    router_name = "embedding"

    @pytest.fixture
    def router(self, routing_model):
        return EmbeddingRouter(hidden_layer=2, top_k=2, temperature=0.05).fit(routing_model, EXAMPLES)


def request_with(names, hidden, mask=None):
    return RoutingRequest(input_ids=torch.zeros(hidden.shape[:2], dtype=torch.long), adapter_names=names,
                          attention_mask=mask, hidden_states=hidden)


def test_top_k_softmax_weights_and_slots():
    router = EmbeddingRouter({"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0]),
                              "c": torch.tensor([-1.0, 0.0])}, hidden_layer=0, top_k=2, temperature=0.5)
    hidden = torch.tensor([[[2.0, 1.0]], [[0.0, -3.0]]])  # rows: mostly a, then b; mostly -b
    decision = router.route(request_with(["x", "c", "b", "a"], hidden))  # slots differ from centroid order
    sims = torch.tensor([[0.8944, 0.4472, -0.8944], [0.0, -1.0, 0.0]])
    assert decision.ids[0].tolist() == [3, 2]  # a, b
    expected = torch.softmax(sims[0, :2] / 0.5, dim=0)
    torch.testing.assert_close(decision.weights[0], expected, rtol=0, atol=1e-4)
    assert set(decision.ids[1].tolist()) == {3, 1}  # a and c tie at 0
    torch.testing.assert_close(decision.weights.sum(dim=1), torch.ones(2))


def test_masked_mean_ignores_padding_and_min_similarity_falls_back_to_base():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 50.0]], [[0.0, 1.0], [0.0, 1.0]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    torch.testing.assert_close(embedding.masked_mean(hidden, mask), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    router = EmbeddingRouter({"a": torch.tensor([1.0, 0.0])}, hidden_layer=0, min_similarity=0.5)
    decision = router.route(request_with(["a"], hidden, mask))
    assert decision.to_mixtures(["a"]) == [{"a": 1.0}, {}]


def test_fit_separates_domains_and_routes_in_the_same_forward(moa_tiny_model):
    model = moa_tiny_model
    for name in EXAMPLES:
        model.add_adapter(name, moa.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    router = EmbeddingRouter(hidden_layer=1, temperature=0.01).fit(model, EXAMPLES)
    model.set_router(router)
    routed = model.route([EXAMPLES["alpha"][0], EXAMPLES["beta"][1], EXAMPLES["gamma"][2]])
    assert [max(m, key=m.get) for m in routed] == ["alpha", "beta", "gamma"]
    encoded = model.tokenize([EXAMPLES["beta"][0]])
    with torch.no_grad():
        routed_logits = model(encoded["input_ids"]).logits
    assert routed_logits.shape[:2] == encoded["input_ids"].shape


def test_no_centroid_for_any_loaded_adapter_runs_the_base(caplog):
    router = EmbeddingRouter({"other": torch.ones(4)}, hidden_layer=0)
    decision = router.route(request_with(["a", "b"], torch.ones(3, 2, 4)))
    assert decision.to_mixtures(["a", "b"]) == [{}, {}, {}]
    assert "no loaded adapter has a centroid" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"hidden_layer": -1}, "hidden_layer"), ({"top_k": 0}, "top_k"), ({"temperature": 0}, "temperature"),
     ({"centroids": {"a": torch.ones(2, 2)}}, "1-D"),
     ({"centroids": {"a": torch.ones(2), "b": torch.ones(3)}}, "width")],
)
def test_bad_arguments_are_routing_errors(kwargs, match):
    with pytest.raises(RoutingError, match=match):
        EmbeddingRouter(**kwargs)


def test_missing_hidden_states_and_width_mismatch_are_explained():
    router = EmbeddingRouter({"a": torch.ones(3)}, hidden_layer=0)
    with pytest.raises(RoutingError, match="set_router"):
        router.route(RoutingRequest(input_ids=torch.zeros(1, 2, dtype=torch.long), adapter_names=["a"]))
    with pytest.raises(RoutingError, match="width 3"):
        router.route(request_with(["a"], torch.ones(1, 2, 5)))


def test_save_writes_safetensors_and_json_and_loads_back(tmp_path):
    router = EmbeddingRouter({"a": torch.randn(6), "b": torch.randn(6)}, hidden_layer=3, top_k=2,
                             temperature=0.2, min_similarity=-0.5)
    router.save(tmp_path / "emb")
    assert sorted(p.name for p in (tmp_path / "emb").iterdir()) == ["router.safetensors", "router_config.json"]
    config = json.loads((tmp_path / "emb" / "router_config.json").read_text())
    assert config["adapter_names"] == ["a", "b"] and config["hidden_layer"] == 3
    again = EmbeddingRouter.load(tmp_path / "emb")
    assert again.to_config() == router.to_config()
    for name in ("a", "b"):
        assert torch.equal(again.centroids[name], router.centroids[name])
    with pytest.raises(RoutingError, match="missing"):
        EmbeddingRouter.load(tmp_path / "nowhere")
    (tmp_path / "emb" / "router.safetensors").write_bytes(b"garbage")
    with pytest.raises(RoutingError, match="Could not read"):
        EmbeddingRouter.load(tmp_path / "emb")


def test_registered_through_the_entry_point(moa_plugin_manager):
    assert moa_plugin_manager.get_router("embedding") is EmbeddingRouter
