"""``n`` choices of one prompt inside the engine (no HTTP): one prefill shared by the group,
each choice its own sampling, and every member told when the group is cancelled or the
engine dies; in deterministic mode each choice is a request of its own."""

from __future__ import annotations

import pytest
import torch

from moa.serve.engine import Engine
from moa.serve.requests import EngineDeadError, GenerationRequest, RowRouting, SamplingParams
from tests.serve.conftest import engine_blocked, wait_until
from tests.serve.helpers import routed_tiny_model

PROMPT = [72, 101, 108, 108, 111, 32]


@pytest.fixture(scope="module")
def model():
    return routed_tiny_model({"sql": 4, "code": 8})


def group(n: int, seed: int | None = 5, max_tokens: int = 6, temperature: float = 1.0,
          routing: RowRouting | None = None) -> list[GenerationRequest]:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    return [GenerationRequest(f"c{j}", list(PROMPT), routing or RowRouting.adapter("sql"), params.for_choice(j))
            for j in range(n)]


def alone(engine: Engine, request: GenerationRequest) -> list[int]:
    return engine.submit(request).wait(60).token_ids


@pytest.mark.parametrize("deterministic", [False, True])
def test_each_choice_equals_its_own_request(model, deterministic):
    engine = Engine(model, max_batch_size=4, deterministic=deterministic)
    engine.start()
    try:
        before = engine.stats()["prefilled_requests"]
        handles = engine.submit_choices(group(3))
        answers = [h.wait(60).token_ids for h in handles]
        prefilled = engine.stats()["prefilled_requests"] - before
        assert prefilled == (3 if deterministic else 1)  # shared unless every row runs alone
        assert [alone(engine, r) for r in group(3)] == answers
        assert len({tuple(a) for a in answers}) > 1
    finally:
        engine.shutdown()


def test_a_group_waits_for_room_in_the_batch(model):
    engine = Engine(model, max_batch_size=4)
    engine.start()
    try:
        long = GenerationRequest("long", list(PROMPT), RowRouting.base(),
                                 SamplingParams(max_tokens=30, min_tokens=30, temperature=0))
        with engine_blocked(engine):
            first = [engine.submit(long), engine.submit(long)]
            handles = engine.submit_choices(group(3, routing=RowRouting({"sql": 0.5, "code": 0.5})))
        wait_until(lambda: engine.stats()["running"] >= 2, what="the long rows to run")
        assert engine.stats()["running"] <= 4  # never more rows than the batch holds
        answers = [h.wait(60).token_ids for h in handles]
        assert all(h.wait(60).finish_reason == "length" for h in first)
        assert answers == [alone(engine, r) for r in group(3, routing=RowRouting({"sql": 0.5, "code": 0.5}))]
    finally:
        engine.shutdown()


def test_cancelling_a_waiting_group_cancels_every_choice(model):
    engine = Engine(model, max_batch_size=4)
    engine.start()
    try:
        with engine_blocked(engine):
            handles = engine.submit_choices(group(3))
            for handle in handles:
                handle.cancel()
        assert [h.wait(30).finish_reason for h in handles] == ["cancelled"] * 3
    finally:
        engine.shutdown()


def test_a_dying_engine_fails_every_choice_of_a_waiting_group(model, monkeypatch):
    engine = Engine(model, max_batch_size=4)
    engine.start()
    try:
        with engine_blocked(engine):
            handles = engine.submit_choices(group(3))
            monkeypatch.setattr(engine, "_drop_cancelled", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        for handle in handles:
            with pytest.raises(EngineDeadError, match="boom"):
                handle.wait(30)
    finally:
        engine.shutdown()


def test_greedy_choices_are_identical_and_share_logprobs(model):
    engine = Engine(model, max_batch_size=4)
    engine.start()
    try:
        params = SamplingParams(max_tokens=5, temperature=0, logprobs=2)
        requests = [GenerationRequest(f"g{j}", list(PROMPT), RowRouting.adapter("code"), params) for j in range(2)]
        first, second = [h.wait(60) for h in engine.submit_choices(requests)]
        assert first.token_ids == second.token_ids
        assert first.logprobs[0] == second.logprobs[0]  # the first token comes from the one shared prefill
        for a, b in zip(first.logprobs, second.logprobs, strict=True):  # then two rows of one batch
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        ids = torch.tensor([PROMPT])
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                   pad_token_id=model.tokenizer.pad_token_id, adapter_names=["code"])
        assert first.token_ids == reference[0, len(PROMPT):].tolist()[:len(first.token_ids)]
    finally:
        engine.shutdown()
