"""Evaluation: mixed batches give each row what it gets alone; the report renders."""

from __future__ import annotations

import json

import pytest
import torch

from moa.eval import EvalConfig, evaluate, generate_answers, render_markdown, write_report
from moa.eval.runner import decode_new_tokens, generate_routed
from moa.train.router import train_router
from tests.train.helpers import TOY_DOMAINS, ToyExample, add_random_adapters, load_tiny, toy_examples


@pytest.fixture(scope="module")
def routed_model(tiny_base_dir):
    model = load_tiny(tiny_base_dir)
    add_random_adapters(model)
    gate, _ = train_router(model, toy_examples(8), list(TOY_DOMAINS), progress=False)  # default hidden_layer
    return model, gate


PROMPTS = ["abc what", "12345 compute", "hello there what", "9 compute", "zz"]
ROUTES = [{"alpha": 1.0}, {"beta": 1.0}, {"alpha": 0.7, "beta": 0.3}, None, {"beta": 0.5, "alpha": 0.5}]


def test_batch_invariance_explicit_routes(routed_model):
    """A request's greedy answer is the same alone and inside a mixed batch."""
    model, _ = routed_model
    mixed = generate_answers(model, PROMPTS, ROUTES, max_new_tokens=8, batch_size=len(PROMPTS), progress=False)
    alone = [generate_answers(model, [p], [r], max_new_tokens=8, progress=False)[0]
             for p, r in zip(PROMPTS, ROUTES, strict=True)]
    assert mixed == alone
    assert len(set(mixed)) > 1  # the adapters really differ


def test_batch_invariance_with_the_gate(routed_model):
    model, gate = routed_model
    mixed, decisions = generate_routed(model, PROMPTS, gate, max_new_tokens=8, batch_size=len(PROMPTS),
                                       progress=False)
    assert {max(d, key=d.get) for d in decisions} == set(TOY_DOMAINS)  # a really mixed batch
    for i, prompt in enumerate(PROMPTS):
        answer, decision = generate_routed(model, [prompt], gate, max_new_tokens=8, progress=False)
        assert answer == [mixed[i]] and decision == [decisions[i]]  # top-1: weights are exactly 1
    assert model.router is None  # restored
    # the routed answers equal the explicit answers of the same decisions
    explicit = generate_answers(model, PROMPTS, decisions, max_new_tokens=8, batch_size=5, progress=False)
    assert explicit == mixed


def test_per_row_budgets_cut_answers(routed_model):
    model, _ = routed_model
    long = generate_answers(model, PROMPTS[:2], ROUTES[:2], max_new_tokens=[6, 6], progress=False)
    short = generate_answers(model, PROMPTS[:2], ROUTES[:2], max_new_tokens=[2, 6], progress=False)
    assert short[1] == long[1]
    assert long[0].replace(" ", "").startswith(short[0].replace(" ", ""))


def test_decode_stops_at_end_of_turn(routed_model):
    model, _ = routed_model
    tok = model.tokenizer
    ids = torch.tensor(tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] +
                       tok("cd", add_special_tokens=False)["input_ids"])
    assert decode_new_tokens(tok, ids, 10).replace(" ", "") == "ab"
    assert decode_new_tokens(tok, ids, 1).replace(" ", "") == "a"


def test_evaluate_and_report_render_markdown_json_png(routed_model, tmp_path):
    model, gate = routed_model
    examples = {d: [e for e in toy_examples(3, seed=5) if e.domain == d] for d in TOY_DOMAINS}
    composite = [ToyExample("c-0", "toy-composite", "abc 123 what", "x1", meta={"combines": ["alpha", "beta"]})]
    result = evaluate(model, examples, list(TOY_DOMAINS), gate=gate, composite=composite,
                      config=EvalConfig(batch_size=4, progress=False))
    assert result["domains"] == list(TOY_DOMAINS) and result["examples_per_domain"] == {"alpha": 3, "beta": 3}
    for d in TOY_DOMAINS:
        row = result["scores"][d]
        assert set(row) >= {"base", "oracle", "gate", "uniform"}
        assert row["oracle"] == result["matrix"][d][d]
    assert result["routing"]["overall"] is not None
    assert sum(map(sum, result["routing"]["confusion"])) == 6
    assert set(result["composite"]["scores"]) == {"base", "uniform", "adapter:alpha", "adapter:beta", "pair_mixture",
                                                  "gate"}
    configs = {r["config"] for r in result["records"]}
    assert configs == {"base", "adapter:alpha", "adapter:beta", "uniform", "gate", "pair_mixture"}
    paths = write_report(result, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["adapters"] == list(TOY_DOMAINS)
    text = paths["markdown"].read_text()
    assert "| domain | n | base | oracle | learned gate |" in text and "Routing confusion" in text
    assert "Composite prompts" in text and text == render_markdown(result)
    for key in ("scores_png", "confusion_png", "routing_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_runs_on_its_own_without_the_matrix(routed_model):
    model, gate = routed_model
    examples = {d: [e for e in toy_examples(2, seed=7) if e.domain == d] for d in TOY_DOMAINS}
    result = evaluate(model, examples, list(TOY_DOMAINS), gate=None,
                      config=EvalConfig(configs=("oracle",), progress=False, composite=False))
    assert {r["config"] for r in result["records"]} == {"oracle"}
    assert all(result["scores"][d]["oracle"] is not None for d in TOY_DOMAINS)
    assert "Domain × adapter" not in render_markdown(result)


def test_matrix_limit_cuts_only_the_off_diagonal_cells(routed_model):
    model, _ = routed_model
    examples = {d: [e for e in toy_examples(3, seed=9) if e.domain == d] for d in TOY_DOMAINS}
    full = evaluate(model, examples, list(TOY_DOMAINS), gate=None,
                    config=EvalConfig(configs=("matrix",), progress=False, composite=False))
    cut = evaluate(model, examples, list(TOY_DOMAINS), gate=None,
                   config=EvalConfig(configs=("matrix",), matrix_limit=1, progress=False, composite=False))
    for d in TOY_DOMAINS:
        for a in TOY_DOMAINS:
            assert cut["matrix_examples"][d][a] == (3 if a == d else 1)
            assert full["matrix_examples"][d][a] == 3
        assert cut["scores"][d]["oracle"] == full["scores"][d]["oracle"]  # the diagonal is untouched
    assert "off-diagonal cells on the first 1 of each domain" in render_markdown(cut)
    assert "off-diagonal" not in render_markdown(full)
