"""Faults stay with their request: one row's sampling error, a failing decode forward, admin
calls that time out or come too late never take the engine (or the other requests) down."""

from __future__ import annotations

import threading

import pytest
import torch

from moa.serve.engine import Engine
from moa.serve.model_runner import ModelRunner
from moa.serve.requests import EngineDeadError, EngineTimeoutError, GenerationRequest, RowRouting, SamplingParams
from tests.serve.conftest import engine_blocked, wait_until
from tests.serve.helpers import greedy_alone, routed_tiny_model

PROMPTS = [[5, 9, 13, 2, 7], [40, 41], [3, 3, 3, 3, 3, 3], [100, 7, 19, 54], [72, 101, 108], [8, 8, 9]]
MIXTURES = [{"sql": 1.0}, {"code": 0.7, "sql": 0.3}, {}, {"code": 1.0}, {"sql": 1.0}, {}]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model():
    return routed_tiny_model({"sql": 4, "code": 8})


class ExplodingGuide:
    """A structured-output guide that raises at its ``at``-th token (a grammar bug, say)."""

    def __init__(self, at: int):
        self.at, self.seen, self.stopped = at, 0, False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.seen == self.at:
            raise RuntimeError("simulated failure in one row's sampling")
        return logits

    def advance(self, token: int) -> None:
        self.seen += 1


def request(i: int, guide=None) -> GenerationRequest:
    return GenerationRequest(f"r{i}", list(PROMPTS[i]), RowRouting(MIXTURES[i]),
                             SamplingParams(max_tokens=MAX_TOKENS, temperature=0, min_tokens=MAX_TOKENS), guide)


def offline(model, i: int) -> list[int]:
    return greedy_alone(model, PROMPTS[i], MIXTURES[i] or None, MAX_TOKENS)


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_row_whose_sampling_raises_mid_batch_fails_alone(model, deterministic):
    engine = Engine(model, max_batch_size=8, deterministic=deterministic)
    engine.start()
    try:
        with engine_blocked(engine):  # all six in one batch
            handles = [engine.submit(request(i, ExplodingGuide(3) if i == 2 else None)) for i in range(6)]
        with pytest.raises(RuntimeError, match="simulated failure in one row's sampling"):
            handles[2].wait(60)
        for i, handle in enumerate(handles):
            if i != 2:
                assert handle.wait(60).token_ids == offline(model, i), f"request {i} changed"
        assert engine.alive
    finally:
        engine.shutdown()


def test_a_failing_decode_forward_fails_its_rows_and_the_engine_serves_on(model, monkeypatch):
    engine = Engine(model, max_batch_size=8)
    real_decode = ModelRunner.decode
    calls = {"n": 0}

    def decode_failing_once(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure of a decode forward")
        return real_decode(self, rows)

    monkeypatch.setattr(ModelRunner, "decode", decode_failing_once)
    monkeypatch.setattr(engine, "mixed_steps", False)  # every step a plain decode forward
    engine.start()
    try:
        with engine_blocked(engine):
            first = [engine.submit(request(i)) for i in range(3)]
        for handle in first:
            with pytest.raises(RuntimeError, match="simulated failure of a decode forward"):
                handle.wait(60)
        assert engine.alive
        later = [engine.submit(request(i)) for i in range(3, 6)]
        assert [h.wait(60).token_ids for h in later] == [offline(model, i) for i in range(3, 6)]
    finally:
        engine.shutdown()


def test_an_admin_call_that_cannot_run_in_time_is_withdrawn(model):
    engine = Engine(model)
    engine.start()
    ran = threading.Event()
    try:
        with engine_blocked(engine):
            with pytest.raises(EngineTimeoutError, match="did not get to this adapter change within 0.2 s"):
                engine.call(ran.set, timeout=0.2)
        assert engine.call(lambda: 42) == 42  # the engine went on; the withdrawn call never ran
        assert not ran.is_set()
    finally:
        engine.shutdown()


def test_admin_calls_during_shutdown_fail_or_run_but_never_hang(model):
    engine = Engine(model)
    engine.start()
    results: list = []
    with engine_blocked(engine) as release:
        queued = threading.Thread(target=lambda: results.append(_outcome(engine.call, lambda: "ran")))
        queued.start()  # queued before the shutdown: it runs (or fails) before the loop ends
        wait_until(lambda: engine.stats()["admin_pending"] == 1, what="the call queued")
        stopper = threading.Thread(target=engine.shutdown)
        stopper.start()
        wait_until(lambda: not engine.alive, what="the engine stopping")
        with pytest.raises(EngineDeadError, match="shutting down"):  # asked after: refused at once
            engine.call(lambda: "too late")
        release.set()
        stopper.join(30)
        queued.join(30)
    assert not queued.is_alive() and not stopper.is_alive()
    assert results == ["ran"]


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - the test inspects it
        return error
