"""A mixed step (decode the running rows + prefill new prompts in one forward) computes what
a decode step and each prompt's own prefill compute apart.

References, on the tiny model with random adapters of different ranks: the running rows'
decode step through the batch cache as the engine runs it without mixed steps, and each new
prompt prefilled alone. Float sums of a larger forward may differ in the last bits, so
values compare with a float32 tolerance; the controls show a wrong routing or a token
leaking into another request moves them far more. Then the engine: requests that arrive
while a row runs are prefilled inside decode steps and every greedy answer equals
``model.generate`` of that request alone; a mixed step that fails puts the batch cache back
and prefills the new requests on their own.
"""

from __future__ import annotations

import time

import pytest
import torch

import moa
from moa.serve import mixed_step, packing
from moa.serve.batch_cache import BatchCache, cache_argument, layer_tensors, new_cache
from moa.serve.engine import Engine
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
from tests.serve.helpers import routed_tiny_model

RUNNING = [[5, 9, 13, 2, 7], [40, 41], [3, 3, 3, 3, 3, 3, 3, 3]]
RUNNING_MIXTURES = [{"sql": 1.0}, {"code": 0.7, "french": 0.3}, None]
RUNNING_LAYERS = [0, 0, 2]
NEXT_TOKENS = [17, 88, 120]
PROMPTS = [[100, 7, 19, 54], [61, 62, 63, 64, 65, 66]]
PROMPT_MIXTURES = [{"french": 1.0}, {"sql": 0.5, "code": 0.5}]
PROMPT_LAYERS = [2, 0]
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def model():
    tiny = routed_tiny_model({"sql": 4, "code": 8, "french": 16})
    assert mixed_step.enable(tiny)
    return tiny


def routing(mixtures, layers, lengths, model):
    return packing.packed_routing(mixtures, layers, lengths, model.adapter_names)


def prefill_alone(model, prompt, mixture, layer):
    ids = torch.tensor([prompt])
    cache = new_cache(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                    **{cache_argument(model): cache}, **routing([mixture], [layer], [len(prompt)], model))
    return out.logits[0, -1], layer_tensors(cache)


def running_batch(model):
    return BatchCache.from_rows([prefill_alone(model, p, m, layer)[1]
                                 for p, m, layer in zip(RUNNING, RUNNING_MIXTURES, RUNNING_LAYERS, strict=True)])


def decode_apart(model, batch, tokens=NEXT_TOKENS):
    """The reference decode step: the engine's batched decode without mixed steps."""
    inputs = batch.step_inputs(tokens, [len(p) for p in RUNNING], torch.device("cpu"), cache_argument(model))
    decision = moa.RoutingDecision.from_mixtures(RUNNING_MIXTURES, model.adapter_names)
    with torch.no_grad():
        out = model(**inputs, use_cache=True, routing_decision=decision, adapters_from_layer=RUNNING_LAYERS)
    batch.advance()
    return out.logits[:, -1]


def mixed(model, batch, prompts=PROMPTS, mixtures=PROMPT_MIXTURES, layers=PROMPT_LAYERS, tokens=NEXT_TOKENS):
    lengths = [len(p) for p in prompts]
    cache = mixed_step.StepCache(batch.cache, len(RUNNING), lengths)
    inputs = mixed_step.step_inputs(tokens, [len(p) for p in RUNNING], prompts, torch.device("cpu"))
    with torch.no_grad():
        out = model(**inputs, **{cache_argument(model): cache}, use_cache=True,
                    moa_step=mixed_step.StepLayout(cache, batch.attention_mask()),
                    **routing([*RUNNING_MIXTURES, *mixtures], [*RUNNING_LAYERS, *layers],
                              [1] * len(RUNNING) + lengths, model))
    batch.advance()
    return out.logits[0], cache.prompt_rows()


def assert_same_layers(got, expected):
    assert len(got) == len(expected)
    for (k, v), (rk, rv) in zip(got, expected, strict=True):
        torch.testing.assert_close(k, rk, **TOL)
        torch.testing.assert_close(v, rv, **TOL)


def test_a_mixed_step_computes_the_decode_step_and_each_prefill(model):
    reference = running_batch(model)
    ref_logits = decode_apart(model, reference)
    batch = running_batch(model)
    logits, prompt_rows = mixed(model, batch)
    assert logits.shape[0] == len(RUNNING) + len(PROMPTS)
    torch.testing.assert_close(logits[: len(RUNNING)], ref_logits, **TOL)
    torch.testing.assert_close(batch.mask, reference.mask, rtol=0, atol=0)
    assert_same_layers(layer_tensors(batch.cache), layer_tensors(reference.cache))
    for i, (prompt, mixture, layer) in enumerate(zip(PROMPTS, PROMPT_MIXTURES, PROMPT_LAYERS, strict=True)):
        alone_logits, alone_kv = prefill_alone(model, prompt, mixture, layer)
        torch.testing.assert_close(logits[len(RUNNING) + i], alone_logits, **TOL)
        assert_same_layers(prompt_rows[i], alone_kv)


def test_no_token_sees_another_request(model):
    """Controls: a running row's token or a prompt's routing changes only its own request."""
    logits, _ = mixed(model, running_batch(model))
    other_token, _ = mixed(model, running_batch(model), tokens=[99, *NEXT_TOKENS[1:]])
    assert not torch.allclose(logits[0], other_token[0], atol=1e-3)
    torch.testing.assert_close(logits[1:], other_token[1:], **TOL)
    other_routing, _ = mixed(model, running_batch(model), mixtures=[{"code": 1.0}, PROMPT_MIXTURES[1]])
    assert not torch.allclose(logits[3], other_routing[3], atol=1e-3)
    torch.testing.assert_close(logits[[0, 1, 2, 4]], other_routing[[0, 1, 2, 4]], **TOL)


def test_outside_a_mixed_step_the_attention_is_sdpa_bit_for_bit():
    plain, switched = routed_tiny_model({"sql": 4}), routed_tiny_model({"sql": 4})
    assert mixed_step.enable(switched)
    ids = torch.tensor([[5, 9, 13, 2, 7, 40]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "adapter_names": ["sql"], "output_scores": True,
              "return_dict_in_generate": True, "pad_token_id": 257, "eos_token_id": 256}
    with torch.no_grad():
        a = plain.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        b = switched.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores, strict=True))
    mixed_step.disable(switched)
    assert switched.base_model.config._attn_implementation == "sdpa"


def test_a_transformers_that_refuses_the_attention_leaves_mixed_steps_off(monkeypatch, caplog):
    tiny = routed_tiny_model({"sql": 4})

    def refuse(name):
        raise ValueError(f"unknown attention {name}")

    monkeypatch.setattr(tiny.base_model, "set_attn_implementation", refuse)
    assert not mixed_step.enable(tiny)
    assert tiny.base_model.config._attn_implementation == "sdpa"
    assert not Engine(tiny).mixed_steps
    assert "Mixed steps are off" in caplog.text


def offline(model, request):
    ids = torch.tensor([request.prompt_ids])
    params = request.params
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                             min_new_tokens=params.min_tokens, do_sample=False,
                             adapter_weights=[dict(request.routing.mixture) or None], pad_token_id=257,
                             eos_token_id=256)
    return out[0, ids.shape[1]:].tolist()


def serve_while_running(model, **engine_args):
    """One long request starts; three more arrive while it runs. Returns answers and stats."""
    engine = Engine(model, max_batch_size=8, **engine_args)
    engine.start()
    first = GenerationRequest("long", RUNNING[0], RowRouting(RUNNING_MIXTURES[0]),
                              SamplingParams(max_tokens=24, temperature=0, min_tokens=24))
    handles = [engine.submit(first)]
    deadline = time.monotonic() + 30
    while engine.stats()["steps"] < 2:  # it is decoding
        assert time.monotonic() < deadline
        time.sleep(0.001)
    later = [GenerationRequest(f"r{i}", p, RowRouting(m or {}), SamplingParams(max_tokens=6, temperature=0))
             for i, (p, m) in enumerate(zip([*PROMPTS, RUNNING[1]], [*PROMPT_MIXTURES, RUNNING_MIXTURES[1]]))]
    handles += [engine.submit(r) for r in later]
    answers = [h.wait(60).token_ids for h in handles]
    stats = engine.stats()
    engine.shutdown()
    return [first, *later], answers, stats


@pytest.mark.parametrize("mixed_steps", [True, False])
def test_requests_arriving_while_a_row_runs_answer_as_alone(model, mixed_steps):
    requests, answers, stats = serve_while_running(model, mixed_steps=mixed_steps)
    assert answers == [offline(model, request) for request in requests]
    assert len(answers[0]) == 24
    assert (stats["mixed_steps"] >= 1) == mixed_steps
    assert stats["prefilled_requests"] == len(requests)


def test_a_failing_mixed_step_restores_the_batch_and_prefills_apart(model, monkeypatch, caplog):
    real_update = mixed_step.StepCache.update

    def fail_at_layer_1(self, keys, values, layer_idx, *args, **kwargs):
        if layer_idx == 1:  # after layer 0 grew the batch cache
            raise RuntimeError("simulated failure inside a mixed step")
        return real_update(self, keys, values, layer_idx, *args, **kwargs)

    monkeypatch.setattr(mixed_step.StepCache, "update", fail_at_layer_1)
    requests, answers, stats = serve_while_running(model)
    _, reference, _ = serve_while_running(model, mixed_steps=False)
    assert answers == reference
    assert stats["mixed_steps"] == 0
    assert "mixed decode + prefill step failed" in caplog.text
