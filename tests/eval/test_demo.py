"""``moa demo`` end to end on the real default base and the shipped adapters (integration)."""

from __future__ import annotations

import pytest

from moa.eval.assets import shipped_adapters_dir


@pytest.mark.integration
@pytest.mark.skipif(not (shipped_adapters_dir() / "router").is_dir(), reason="demo adapters not trained yet")
def test_demo_serves_one_mixed_batch_routed_by_the_gate():
    from moa.demo import run_demo

    report = run_demo(limit=1, gate_examples_per_domain=12, check_alone=False)
    assert "One mixed batch: 6 requests, ONE generate call" in report
    for domain in ("sql", "arithmetic", "icd", "french", "code", "composite"):
        assert f"\n{domain:<11} " in report
    assert "| domain | n | base | oracle | learned gate |" in report
    # the per-token gate answers one composite request; the code and French adapters both write part of it
    assert "who wrote it (top adapter per token" in report
    writers = report.split("who wrote it (top adapter per token, consecutive tokens joined):\n")[1].split("\n\n")[0]
    assert "  code " in writers and "  french " in writers
