"""examples/compare_routers.py runs end to end on a tiny base and reports every router's accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moa.testing import require_plugin, save_tiny_base

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "compare_routers.py"

require_plugin("moa-router-keyword", "moa_router_keyword")
require_plugin("moa-router-embedding", "moa_router_embedding")


def test_compare_routers_smoke(tmp_path):
    base = save_tiny_base(tmp_path / "base")
    out = tmp_path / "routing.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(base), "--train-per-domain", "2", "--test-per-domain", "2",
         "--hidden-layer", "1", "--gate-epochs", "5", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Routing accuracy on 10 held-out test prompts" in proc.stderr
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"keyword", "embedding", "learned_gate"}
    for result in results["results"].values():
        assert 0.0 <= result["accuracy"]["all"] <= 1.0 and result["counts"]["all"] == 10
    assert results["results"]["keyword"]["accuracy"]["all"] == 1.0  # the rules know these domains
    assert set(results["composite"]) == {"keyword", "embedding", "learned_gate"}
