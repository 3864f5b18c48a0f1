"""The slot comparison's statistics and the gate's ownership agreement (tiny model)."""

from __future__ import annotations

import torch

from moa.eval.slots import DecisionRecorder, ownership_agreement, paired_bootstrap, summarise
from moa.routing.learned_gate import LearnedGate
from moa.train.recipes import DEFAULT_HIDDEN_LAYER
from tests.train.helpers import TOY_DOMAINS, ToyExample, add_random_adapters


def test_paired_bootstrap_against_the_plain_mean():
    a = [True] * 30 + [False] * 10
    b = [True] * 10 + [False] * 30
    mean, low, high = paired_bootstrap(a, b)
    assert abs(mean - 0.5) < 1e-9 and low <= mean <= high and low > 0.2
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)


def test_summary_picks_the_best_non_oracle_baseline_per_task():
    examples = [ToyExample(f"x{i}", "slots", "p", "a", meta={"task": "code_icd"}) for i in range(4)]
    results = {"base": [False] * 4, "single:icd": [True, False, False, False],
               "oracle_switch": [True] * 4, "token_gate": [True, True, True, False]}
    summary = summarise(examples, results)
    assert summary["accuracy"]["token_gate"]["code_icd"] == 0.75
    comparison = summary["gate_vs_best_baseline"]["code_icd"]
    assert comparison["best_baseline"] == "single:icd" and abs(comparison["gate_minus_best"] - 0.5) < 1e-9


def gate_and_examples(model, seed: int, top_k: int, tasks: list[str]) -> tuple[LearnedGate, list[ToyExample]]:
    """Random adapters on ``model``, a seeded linear token gate, and one two-segment item per task."""
    add_random_adapters(model)
    torch.manual_seed(seed)
    gate = LearnedGate(list(TOY_DOMAINS), model.config.hidden_size, hidden_layer=DEFAULT_HIDDEN_LAYER,
                       level="token", top_k=top_k, mlp_hidden=0, dropout=0.0)
    examples = [ToyExample(f"s{i}", "slots", f"abc{i} what", "xy12", meta={
        "task": task, "segments": [["xy", "alpha"], ["12", "beta"]]}) for i, task in enumerate(tasks)]
    return gate, examples


def test_ownership_agreement_counts_answer_positions_against_a_naive_loop(tiny_chat_model):
    model = tiny_chat_model
    gate, examples = gate_and_examples(model, seed=0, top_k=1, tasks=["code_french"] * 3)
    result = ownership_agreement(model, gate, examples, batch_size=2)
    # naive reference: one example at a time, the gate's choice read from its own decision
    from moa.eval.teacher_forced import make_batch, position_owners, routed_rows, teacher_forced_exact

    agree = total = 0
    for example in examples:
        recorder = DecisionRecorder(gate)
        teacher_forced_exact(model, [example], routed_rows(recorder))
        (_, width), decision = recorder.calls[-1]
        item = make_batch(model.tokenizer, [example]).items[0]
        owners = position_owners(item, width)
        for pos in range(item.prompt_length - 1, len(item.input_ids) - 1):
            total += 1
            agree += model.adapter_names[int(decision.ids[pos, 0])] == owners[pos]
    assert result["positions"] == total
    assert abs(result["agreement"] - agree / total) < 1e-9
    assert set(result["samples"]) == {"code_french"}


def test_token_gate_report_scores_agrees_and_draws(tiny_chat_model, tmp_path):
    from moa.eval.slots import token_gate_report
    from moa.eval.teacher_forced import routed_rows, teacher_forced_scores

    model = tiny_chat_model
    gate, examples = gate_and_examples(model, seed=1, top_k=2, tasks=["code_french", "code_french", "code_icd"])
    report = token_gate_report(model, gate, examples, tmp_path / "out")
    exact, shares = teacher_forced_scores(model, examples, routed_rows(gate))  # the reference, item by item
    assert report["exact"] == {"code_french": (exact[0] + exact[1]) / 2, "code_icd": float(exact[2])}
    assert abs(report["token_accuracy"]["code_icd"] - shares[2]) < 1e-9
    assert report["ownership_agreement"] == ownership_agreement(model, gate, examples)["agreement"]
    png = tmp_path / "out" / "token_gate_heatmap.png"
    assert report["heatmap"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
