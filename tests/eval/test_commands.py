"""The CLI: train-router, eval and generate on the tiny base with domain-named adapters."""

from __future__ import annotations

import json

import pytest

from moa.cli import main
from moa.commands.generate import parse_weights
from moa.errors import RoutingError
from tests.train.helpers import add_random_adapters, load_tiny

DOMAINS = ("sql", "arithmetic")


@pytest.fixture(scope="module")
def adapters_dir(tiny_base_dir, tmp_path_factory):
    model = load_tiny(tiny_base_dir)
    add_random_adapters(model, names=DOMAINS)
    out = tmp_path_factory.mktemp("adapters")
    for name in DOMAINS:
        model.save_adapter(name, out / name)
    return out


def _common(tiny_base_dir, adapters_dir):
    return ["--base", str(tiny_base_dir), "--quantization", "none", "--adapters", str(adapters_dir)]


def test_train_router_eval_and_generate(tiny_base_dir, adapters_dir, tmp_path, capsys):
    args = _common(tiny_base_dir, adapters_dir)
    assert main(["train-router", *args, "--examples-per-domain", "30"]) == 0  # default --hidden-layer
    assert (adapters_dir / "router" / "router_config.json").is_file()
    assert "saved gate" in capsys.readouterr().out

    out = tmp_path / "eval"
    assert main(["eval", *args, "--limit", "2", "--domains", ",".join(DOMAINS), "--no-composite",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| domain | n | base | oracle | learned gate |" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["examples_per_domain"] == {"sql": 2, "arithmetic": 2}
    assert result["routing"]["overall"] is not None and (out / "scores_heatmap.png").is_file()

    assert main(["generate", *args, "What is 2 + 3?", "List all albums.", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("adapters:") == 2 and "answer:" in printed
    assert main(["generate", *args, "What is 2 + 3?", "--weights", "sql=0.5,arithmetic=0.5",
                 "--max-new-tokens", "2"]) == 0
    assert "arithmetic=0.50" in capsys.readouterr().out


def test_parse_weights():
    assert parse_weights("sql=0.7, code=0.3") == {"sql": 0.7, "code": 0.3}
    with pytest.raises(RoutingError, match="NAME=WEIGHT"):
        parse_weights("sql:0.7")


def test_eval_scores_a_token_router_on_the_slot_tasks(tiny_base_dir, tmp_path, capsys):
    """``--token-router``: teacher-forced scores per slot task, ownership agreement, and the heatmap."""
    from moa.routing.learned_gate import LearnedGate

    names = ("sql", "arithmetic", "icd", "french", "code")  # the slot tasks' segment owners
    model = load_tiny(tiny_base_dir)
    add_random_adapters(model, names=names)
    adapters = tmp_path / "adapters"
    for name in names:
        model.save_adapter(name, adapters / name)
    gate = LearnedGate(list(names), model.config.hidden_size, level="token", top_k=2, dropout=0.0)
    gate.save(tmp_path / "token_gate")
    out = tmp_path / "eval"
    args = ["--base", str(tiny_base_dir), "--quantization", "none", "--adapters", str(adapters)]
    assert main(["eval", *args, "--limit", "1", "--domains", "sql", "--configs", "base", "--token-router",
                 str(tmp_path / "token_gate"), "--slot-items", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-token gate on 10 slot-task test items (teacher-forced)" in printed
    part = json.loads((out / "eval.json").read_text())["token_gate"]
    assert set(part["exact"]) == {"arithmetic_french", "arithmetic_sql", "code_french", "code_icd", "french_sql"}
    assert 0 <= part["ownership_agreement"] <= 1 and part["positions"] > 0
    assert (out / "token_gate_heatmap.png").read_bytes()[:4] == b"\x89PNG"
