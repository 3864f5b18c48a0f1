"""KeywordRouter: rules, modes, defaults, decoding, persistence, and moa's router contract."""

from __future__ import annotations

import json

import pytest
import torch

from moa.errors import RoutingError
from moa.routing import RoutingRequest
from moa.testing import RouterContract, make_tiny_tokenizer, require_plugin

keyword = require_plugin("moa-router-keyword", "moa_router_keyword")
KeywordRouter = keyword.KeywordRouter
NAMES = ["sql", "code", "math"]


def request(texts, names=NAMES):
    return RoutingRequest(input_ids=torch.zeros(len(texts), 1, dtype=torch.long), adapter_names=names,
                          texts=texts)


class TestKeywordRouterContract(RouterContract):
    router_name = "keyword"

    @pytest.fixture
    def router(self, routing_model):
        return KeywordRouter([(r"\bselect\b", {"alpha": 1.0}), (r"def |return", {"beta": 0.7, "gamma": 0.3})],
                             default={"gamma": 1.0}, tokenizer=routing_model.tokenizer)


def test_first_match_sum_of_matches_and_default():
    rules = [(r"\bselect\b", {"sql": 1.0}), (r"\bdef\b", {"code": 1.0}), (r"\d+ \+ \d+", {"math": 0.5})]
    texts = ["SELECT 1 + 2", "def f(): return 3 + 4", "hello there"]
    first = KeywordRouter(rules, default="code").route(request(texts))
    assert first.to_mixtures(NAMES) == [{"sql": 1.0}, {"code": 1.0}, {"code": 1.0}]
    summed = KeywordRouter(rules, mode="sum", normalize=True).route(request(texts))
    expected = [{"sql": 2 / 3, "math": 1 / 3}, {"code": 2 / 3, "math": 1 / 3}, {}]
    for got, want in zip(summed.to_mixtures(NAMES), expected, strict=True):
        assert got == pytest.approx(want)
    assert summed.ids[2].tolist() == [-1, -1]  # no match, no default: the base model


def test_case_sensitivity_and_from_keywords():
    router = KeywordRouter.from_keywords({"sql": ["select", "c++"], "code": ["def"]}, mode="sum")
    assert router.mixture_for("Select it; I like C++ and def") == {"sql": 2.0, "code": 1.0}
    assert router.mixture_for("selection undefined") is None  # whole words only
    strict = KeywordRouter([("SELECT", {"sql": 1.0})], case_sensitive=True)
    assert strict.mixture_for("select") is None and strict.mixture_for("SELECT") == {"sql": 1.0}


def test_rules_naming_unloaded_adapters_are_skipped(caplog):
    router = KeywordRouter([("x", {"gone": 1.0}), ("x", {"sql": 0.5, "gone": 0.5})], default={"gone": 1.0})
    decision = router.route(request(["x", "y"]))
    assert decision.to_mixtures(NAMES) == [{"sql": 0.5}, {}]
    assert sum("'gone'" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_decodes_input_ids_with_the_tokenizer_inside_a_forward():
    tokenizer = make_tiny_tokenizer()
    router = KeywordRouter([(r"\bjoin\b", {"sql": 1.0})], tokenizer=tokenizer)
    encoded = tokenizer(["a JOIN b", "plain"], return_tensors="pt", padding=True)
    decision = router.route(RoutingRequest(input_ids=encoded["input_ids"], adapter_names=NAMES,
                                           attention_mask=encoded["attention_mask"]))
    assert decision.to_mixtures(NAMES) == [{"sql": 1.0}, {}]
    with pytest.raises(RoutingError, match="tokenizer=model.tokenizer"):
        KeywordRouter([("a", {"sql": 1.0})]).route(RoutingRequest(input_ids=encoded["input_ids"],
                                                                  adapter_names=NAMES))


def test_model_routes_with_keyword_router(moa_tiny_model):
    import moa

    for name in NAMES:
        moa_tiny_model.add_adapter(name, moa.LoraConfig(r=2, target_modules=["q_proj"]))
    moa_tiny_model.set_router(KeywordRouter.from_keywords({"sql": ["select"], "math": ["sum"]},
                                                          tokenizer=moa_tiny_model.tokenizer))
    assert moa_tiny_model.route(["select *", "the sum of", "nothing"]) == [{"sql": 1.0}, {"math": 1.0}, {}]
    encoded = moa_tiny_model.tokenize(["select *", "nothing"])
    logits = moa_tiny_model(encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    assert logits.shape[:2] == encoded["input_ids"].shape


@pytest.mark.parametrize(
    ("rules", "kwargs", "match"),
    [
        ([("(", {"sql": 1.0})], {}, "not a valid regex"),
        ([("a", {"sql": -1.0})], {}, "finite number >= 0"),
        ([("a", {"sql": float("nan")})], {}, "finite number >= 0"),
        ([("a", {})], {}, "non-empty dict"),
        (["a"], {}, "expected"),
        ([("a", {"sql": 1.0})], {"mode": "all"}, "mode"),
    ],
)
def test_bad_rules_are_routing_errors(rules, kwargs, match):
    with pytest.raises(RoutingError, match=match):
        KeywordRouter(rules, **kwargs)


def test_save_and_load_round_trip(tmp_path):
    router = KeywordRouter([(r"\bselect\b", {"sql": 1.0})], mode="sum", default={"code": 0.5}, normalize=True)
    router.save(tmp_path / "kw")
    assert sorted(p.name for p in (tmp_path / "kw").iterdir()) == ["router_config.json"]
    config = json.loads((tmp_path / "kw" / "router_config.json").read_text())
    assert config["router"] == "keyword" and config["rules"] == [{"pattern": r"\bselect\b",
                                                                 "weights": {"sql": 1.0}}]
    again = KeywordRouter.load(tmp_path / "kw")
    assert again.to_config() == router.to_config()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "router_config.json").write_text(json.dumps({"router": "embedding"}))
    with pytest.raises(RoutingError, match="'embedding' router"):
        KeywordRouter.load(tmp_path / "other")
    with pytest.raises(RoutingError, match="does not exist"):
        KeywordRouter.load(tmp_path / "missing")


def test_registered_through_the_entry_point(moa_plugin_manager):
    assert moa_plugin_manager.get_router("keyword") is KeywordRouter
