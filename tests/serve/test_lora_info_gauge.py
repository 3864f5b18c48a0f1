"""``vllm:lora_requests_info`` read from ``/metrics`` the way the Gateway API Inference Extension reads it.

The endpoint picker (GIE / llm-d, ``getLatestLoraMetric`` and ``promToPodMetrics`` of its vLLM
metrics client) parses the Prometheus text, drops the series whose ``running_lora_adapters``
and ``waiting_lora_adapters`` are both empty, keeps the one with the largest value (the Unix
time it was last updated), splits both labels on ``,`` into the pod's active adapters and
reads ``max_lora`` as an integer; with no such series it keeps what it knew. :func:`pick`
does exactly that, and the tests drive a live ``moa serve`` through idle, waiting, running and
idle again, checking what the picker concludes at each scrape.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.serve.conftest import engine_blocked, serving_stack, wait_until

pytest.importorskip("prometheus_client")

FAMILY = "vllm:lora_requests_info"


def series(text: str) -> list[tuple[dict[str, str], float]]:
    """Every ``vllm:lora_requests_info`` series in a ``/metrics`` text: (labels, value).

    Raises:
        AssertionError: the family is missing (the picker reports an error then).
    """
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == FAMILY:
            assert family.type == "gauge"
            return [(dict(sample.labels), float(sample.value)) for sample in family.samples]
    raise AssertionError(f"{FAMILY} is missing from /metrics")


def pick(text: str) -> tuple[set[str], int, float] | None:
    """What the picker learns from a scrape: (active adapters, max_lora, series time), or
    ``None`` when every series is empty (it then keeps the adapters it knew)."""
    latest: tuple[dict[str, str], float] | None = None
    for labels, value in series(text):
        if labels.get("running_lora_adapters", "") == "" and labels.get("waiting_lora_adapters", "") == "":
            continue
        if latest is None or value > latest[1]:
            latest = (labels, value)
    if latest is None:
        return None
    labels, value = latest
    active = {name for key in ("running_lora_adapters", "waiting_lora_adapters")
              for name in labels.get(key, "").split(",") if name}
    return active, int(labels["max_lora"]), value


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """No router, max_loras=2 (sql, code resident; french, icd registered)."""
    with serving_stack(tmp_path_factory.mktemp("lora-info"), router=False, max_loras=2,
                       resident=("sql", "code")) as live:
        yield live


def scrape(stack: Any) -> tuple[str, float, float]:
    """(``/metrics`` text, time before, time after)."""
    before = time.time()
    status, _, body = stack.http("GET", "/metrics")
    assert status == 200
    return body.decode(), before, time.time()


def test_present_when_idle_with_empty_labels_and_a_timestamp(stack):
    text, before, after = scrape(stack)
    [(labels, value)] = series(text)
    assert labels == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert before <= value <= after
    assert pick(text) is None  # nothing active: the picker keeps what it knew


def test_waiting_running_then_idle_as_the_picker_sees_them(stack):
    client = stack.client()
    results: dict[str, Any] = {}

    def mixture_request() -> None:
        results["mixture"] = client.completions.create(
            model="tiny-base", prompt="wait", max_tokens=2, temperature=0,
            extra_body={"adapter_weights": {"sql": 0.5, "code": 0.5}}).choices[0].text

    # Waiting: the engine is held between two steps, the request queues.
    with engine_blocked(stack.engine):
        thread = threading.Thread(target=mixture_request, daemon=True)
        thread.start()
        wait_until(lambda: stack.engine.stats()["queued"] == 1, what="one queued request")
        text, before, after = scrape(stack)
    thread.join(30)
    assert "mixture" in results
    [(labels, value)] = series(text)
    assert labels == {"max_lora": "2", "running_lora_adapters": "", "waiting_lora_adapters": "code,sql"}
    assert pick(text) == ({"code", "sql"}, 2, value) and before <= value <= after

    # Running: a long stream is decoding when the engine is held.
    stream = client.completions.create(model="code", prompt="run", max_tokens=200,
                                       extra_body={"min_tokens": 200}, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks)
    with engine_blocked(stack.engine):
        running_text, before, after = scrape(stack)
    stream.close()
    [(labels, running_at)] = series(running_text)
    assert labels["running_lora_adapters"] == "code" and labels["waiting_lora_adapters"] == ""
    assert pick(running_text) == ({"code"}, 2, running_at) and before <= running_at <= after

    # Idle again: the last active set stays, with the time it was last seen; the current
    # (empty) set is newer, and the picker skips it.
    wait_until(lambda: stack.engine.stats()["running"] == 0, what="the engine to go idle")
    idle_text, before, after = scrape(stack)
    idle = series(idle_text)
    assert len(idle) == 2
    empty = [value for labels, value in idle if not labels["running_lora_adapters"]
             and not labels["waiting_lora_adapters"]]
    assert len(empty) == 1 and before <= empty[0] <= after and empty[0] > running_at
    assert pick(idle_text) == ({"code"}, 2, running_at)
    later_text, _, _ = scrape(stack)
    assert pick(later_text) == ({"code"}, 2, running_at)  # unchanged until something runs


def test_semantics_step_by_step():
    from moa.serve.metrics import ServeMetrics

    metrics = ServeMetrics()
    text = lambda: metrics.render().decode()  # noqa: E731
    metrics.set_lora_info([], [], 4, now=50.0)
    assert series(text()) == [({"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}, 50.0)]
    metrics.set_lora_info(["a", "b"], ["c"], 4, now=100.0)
    assert series(text()) == [({"max_lora": "4", "running_lora_adapters": "a,b", "waiting_lora_adapters": "c"},
                               100.0)]
    assert pick(text()) == ({"a", "b", "c"}, 4, 100.0)
    metrics.set_lora_info([], [], 4, now=200.0)
    metrics.set_lora_info([], [], 4, now=300.0)
    assert sorted(value for _, value in series(text())) == [100.0, 300.0]
    assert pick(text()) == ({"a", "b", "c"}, 4, 100.0)
    metrics.set_lora_info(["d"], [], 4, now=400.0)  # a new active set replaces the old one
    assert series(text()) == [({"max_lora": "4", "running_lora_adapters": "d", "waiting_lora_adapters": ""}, 400.0)]


def test_max_lora_without_a_limit_counts_every_loadable_adapter(tmp_path):
    with serving_stack(tmp_path, router=False, max_loras=None, resident=("sql",)) as live:
        text, _, _ = scrape(live)
        [(labels, _)] = series(text)
        assert labels["max_lora"] == str(len(live.cache.registered())) == "4"
