"""A bounded soak of ``moa serve``: ~150 requests from 16 clients, a tenth of them hostile.

The soak is ``benchmarks/serve_soak.py``'s (:func:`run_soak`, HTTP only), here against the
tiny in-process server of the other serving tests (tests/serve/conftest.py) with runtime
loading on and ``max_loras=5``, so churned adapters evict ``icd`` (the one adapter the gate
does not pin) and it is reloaded while clients use it. Checks: ``/health`` stays 200, every
status is one its kind allows (no 5xx), every good greedy answer equals the same request
sent alone afterwards, no row is left running, and (loosely: the server shares this process
with the clients) memory does not grow.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.serve.conftest import serving_stack

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_soak.py"
#: Short prompts: the stack accepts 96 prompt tokens (bytes, with the chat fallback template).
PROMPTS = tuple(f"soak {i}: " + "abcdefghij"[: 3 + i % 7] * (1 + i % 4) for i in range(6))


def load_soak() -> object:
    """``benchmarks/serve_soak.py`` as a module (benchmarks/ is not a package)."""
    if "serve_soak" in sys.modules:
        return sys.modules["serve_soak"]
    spec = importlib.util.spec_from_file_location("serve_soak", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_soak"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_soak_plan_mixes_every_hostile_kind():
    soak = load_soak()
    target = soak.SoakTarget("http://127.0.0.1:1", "tiny-base", ("sql", "code"), ("/a", "/b"), True, PROMPTS)
    calls = [soak.plan_call(target, i, 0.1) for i in range(240)]
    kinds = {c.kind for c in calls}
    assert kinds == {"good", *soak.HOSTILE_KINDS}
    assert sum(c.kind != "good" for c in calls) == 24
    good = [c for c in calls if c.kind == "good"]
    assert all(c.body["temperature"] == 0 for c in good) and any(c.stream for c in good)
    assert {c.path for c in good} == {soak.CHAT, soak.COMPLETIONS}
    assert calls == [soak.plan_call(target, i, 0.1) for i in range(240)], "the plan is reproducible"
    streamed = next(c for c in good if c.stream)
    assert "stream" not in json.loads(streamed.key())[1]


def test_bounded_soak(tmp_path):
    soak = load_soak()
    with serving_stack(tmp_path, allow_runtime_loading=True, max_loras=5, max_batch_size=16,
                       max_queue=64) as stack:
        target = soak.SoakTarget(stack.base_url, "tiny-base", ("sql", "code", "french", "icd"),
                                 tuple(str(p) for p in stack.folders.values()), True, PROMPTS,
                                 max_tokens=6, long_max_tokens=96)
        result = soak.run_soak(target, requests=150, clients=(16, 16), hostile_share=0.1, warmup=32,
                               memory_tolerance=None)
    summary = json.dumps({k: result[k] for k in ("statuses_by_kind", "health_failures", "unexpected",
                                                  "mismatches", "gauges_after")}, indent=1, default=str)
    assert result["calls"] == 150 and result["good"] >= 130
    assert result["checks"]["no_engine_death"], summary
    assert result["checks"]["statuses"], summary
    assert result["checks"]["greedy_equal_alone"], summary
    assert result["checks"]["drained"], summary
    assert result["distinct_good_requests"] >= 40
    hostile = result["statuses_by_kind"]
    assert hostile["malformed_json"] == {"400": sum(hostile["malformed_json"].values())}
    assert "cut" in hostile["disconnect"]
    assert result["gauges_after"]["moa_adapter_evictions"] > 0, "the admin churn should have evicted adapters"
    # The server shares this process with 16 client threads: only gross growth is a finding here.
    assert result["pss_growth"] < 0.5, summary
