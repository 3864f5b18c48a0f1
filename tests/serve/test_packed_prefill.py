"""Requests admitted together are prefilled in one packed forward and answer as if alone.

Float sums of a packed forward may differ from the prompt alone in the last bits (larger
products, a masked attention kernel), so logits and keys/values compare with a float32
tolerance; the controls show the tolerance is far below what a wrong routing changes.

The reference is each prompt run alone (its own forward, its own cache), on the tiny model
with random adapters of different ranks: the packed forward's last-token logits and every
layer's keys/values must match it, per prompt, whatever the other prompts and their routing
(names, mixtures, the base, adapters from a later layer). Then the engine: requests queued
while it is busy are admitted together in ONE prefill forward, and every greedy answer
equals ``model.generate`` of that request alone; a failing packed forward falls back to
prefilling each request alone.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import moa
from moa.serve import packing
from moa.serve.batch_cache import BatchCache, cache_argument, layer_tensors, new_cache
from moa.serve.engine import Engine
from moa.serve.model_runner import ModelRunner
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
from tests.serve.helpers import routed_tiny_model

RANKS = {"sql": 4, "code": 8, "french": 16}
PROMPTS = [[5, 9, 13, 2, 7], [40, 41], [3, 3, 3, 3, 3, 3, 3, 3, 3], [100, 7, 19, 54]]
MIXTURES = [{"sql": 1.0}, {"code": 0.7, "french": 0.3}, None, {"french": 1.0}]
FROM_LAYERS = [0, 0, 0, 2]


@pytest.fixture(scope="module")
def model():
    return routed_tiny_model(RANKS)


def alone(model, prompt, mixture, from_layer):
    ids = torch.tensor([prompt])
    cache = new_cache(model)
    routing = {"routing_decision": moa.RoutingDecision.from_mixtures([mixture], model.adapter_names),
               "adapters_from_layer": from_layer}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                    **{cache_argument(model): cache}, **routing)
    return out.logits[0, -1], layer_tensors(cache)


def packed(model, prompts, mixtures, from_layers):
    inputs = packing.packed_inputs(prompts, torch.device("cpu"), torch.float32)
    lengths = [len(p) for p in prompts]
    routing = packing.packed_routing(mixtures, from_layers, lengths, model.adapter_names)
    cache = new_cache(model)
    with torch.no_grad():
        out = model(**inputs, **{cache_argument(model): cache}, use_cache=True, **routing)
    return out.logits[0], packing.split(layer_tensors(cache), lengths)


def test_each_packed_prompt_gets_what_it_gets_alone(model):
    logits, rows = packed(model, PROMPTS, MIXTURES, FROM_LAYERS)
    assert logits.shape[0] == len(PROMPTS)
    for i, (prompt, mixture, layer) in enumerate(zip(PROMPTS, MIXTURES, FROM_LAYERS, strict=True)):
        ref_logits, ref_kv = alone(model, prompt, mixture, layer)
        torch.testing.assert_close(logits[i], ref_logits, rtol=1e-4, atol=1e-4)
        assert len(rows[i]) == len(ref_kv)
        for (k, v), (rk, rv) in zip(rows[i], ref_kv, strict=True):
            torch.testing.assert_close(k, rk, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v, rv, rtol=1e-4, atol=1e-4)


def test_the_routing_and_the_first_layer_are_per_prompt(model):
    """Controls: another prompt's adapter, or adapters from layer 0, would change the answer."""
    logits, _ = packed(model, PROMPTS, MIXTURES, FROM_LAYERS)
    swapped, _ = packed(model, PROMPTS, [MIXTURES[3], *MIXTURES[1:3], MIXTURES[0]], FROM_LAYERS)
    assert not torch.allclose(logits[0], swapped[0], atol=1e-3)
    torch.testing.assert_close(logits[1:3], swapped[1:3], rtol=1e-4, atol=1e-4)  # the others unchanged
    from_zero, _ = packed(model, PROMPTS, MIXTURES, [0, 0, 0, 0])
    assert not torch.allclose(logits[3], from_zero[3], atol=1e-3)
    torch.testing.assert_close(logits[:3], from_zero[:3], rtol=1e-4, atol=1e-4)


def test_rows_joined_at_once_equal_rows_joined_one_by_one(model):
    _, rows = packed(model, PROMPTS, MIXTURES, FROM_LAYERS)
    together = BatchCache.from_rows(rows)
    one_by_one = BatchCache.from_rows(rows[:1])
    for row in rows[1:]:
        one_by_one.join_rows([row])
    assert torch.equal(together.mask, one_by_one.mask)
    assert together.mask.sum(1).tolist() == [len(p) for p in PROMPTS]
    for (k1, v1), (k2, v2) in zip(layer_tensors(together.cache), layer_tensors(one_by_one.cache), strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def run_queued(model, requests, **engine_args):
    """Queue ``requests`` while the engine is held busy, then let it admit them all at once."""
    engine = Engine(model, max_batch_size=8, **engine_args)
    engine.start()
    held, release = threading.Event(), threading.Event()
    blocker = threading.Thread(target=lambda: engine.call(lambda: (held.set(), release.wait(30))))
    blocker.start()
    assert held.wait(30)
    try:
        handles = [engine.submit(r) for r in requests]
    finally:
        release.set()
        blocker.join(30)
    completions = [h.wait(60) for h in handles]
    stats = engine.stats()
    engine.shutdown()
    return completions, stats


def requests_for(prompts, mixtures, max_tokens=6):
    return [GenerationRequest(f"r{i}", list(p), RowRouting(m or {}), SamplingParams(max_tokens=max_tokens,
                                                                                     temperature=0))
            for i, (p, m) in enumerate(zip(prompts, mixtures, strict=True))]


def offline(model, prompt, mixture, max_tokens=6):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             adapter_weights=[mixture], pad_token_id=257, eos_token_id=256)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("deterministic", [False, True])
def test_requests_admitted_together_share_one_prefill_and_answer_as_alone(model, deterministic):
    prompts = PROMPTS * 2
    mixtures = MIXTURES + MIXTURES[::-1]
    completions, stats = run_queued(model, requests_for(prompts, mixtures), deterministic=deterministic)
    for completion, prompt, mixture in zip(completions, prompts, mixtures, strict=True):
        expected = offline(model, prompt, mixture)
        assert completion.token_ids == expected[: len(completion.token_ids)]
        assert len(completion.token_ids) == len(expected)
    assert stats["prefilled_requests"] == len(prompts)
    # the batched engine packs all eight queued prompts in one forward; deterministic prefills each alone
    assert stats["prefill_forwards"] == (len(prompts) if deterministic else 1)


def test_the_engine_counts_its_busy_time_apart_from_its_idle_time(model):
    engine = Engine(model, max_batch_size=8)
    engine.start()
    try:
        time.sleep(0.5)  # idle: waiting for requests is not work
        assert engine.stats()["busy_seconds"] < 0.25
        started = time.perf_counter()
        for handle in [engine.submit(r) for r in requests_for(PROMPTS, MIXTURES)]:
            handle.wait(60)
        elapsed = time.perf_counter() - started
        busy = engine.stats()["busy_seconds"]
        assert 0 < busy <= elapsed + 0.25
    finally:
        engine.shutdown()


def test_the_prefill_token_budget_splits_the_admission(model):
    budget = len(PROMPTS[0]) + len(PROMPTS[1])  # the first two fit, the third does not
    completions, stats = run_queued(model, requests_for(PROMPTS, MIXTURES), max_prefill_tokens=budget)
    assert [c.token_ids for c in completions] == [offline(model, p, m) for p, m in zip(PROMPTS, MIXTURES)]
    assert stats["prefill_forwards"] == 3  # [0, 1] together, then [2] (9 tokens > budget) alone, then [3]


def test_a_failing_packed_prefill_falls_back_to_each_request_alone(model, monkeypatch, caplog):
    def broken(self, rows):
        raise RuntimeError("simulated failure of the packed forward")

    monkeypatch.setattr(ModelRunner, "prefill_packed", broken)
    completions, stats = run_queued(model, requests_for(PROMPTS, MIXTURES))
    assert [c.token_ids for c in completions] == [offline(model, p, m) for p, m in zip(PROMPTS, MIXTURES)]
    assert stats["prefill_forwards"] == len(PROMPTS)
    assert "prefilling them one by one" in caplog.text
