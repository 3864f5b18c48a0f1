"""A token-level router served exactly: each ``auto`` request gets what ``model.generate`` gives it
alone with that router (the router decides every token inside the forwards), in one batch with
named and mixed requests, through packed prefills, mixed steps and chunked prompts."""

from __future__ import annotations

import pytest
import torch

from moa.routing.learned_gate import LearnedGate
from moa.serve.engine import Engine
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
from tests.serve.conftest import engine_blocked
from tests.serve.helpers import greedy_alone, routed_tiny_model

ADAPTERS = {"sql": 4, "code": 8, "french": 16}
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def model():
    tiny = routed_tiny_model(ADAPTERS)
    torch.manual_seed(11)
    gate = LearnedGate(list(ADAPTERS), hidden_size=tiny.config.hidden_size, hidden_layer=1, mlp_hidden=16, top_k=1,
                       level="token")
    with torch.no_grad():  # confident per-token picks that change along an answer
        for param in gate.head.parameters():
            param.normal_(0, 2.0)
    tiny.set_router(gate.eval())
    return tiny


def prompts(count: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (int(torch.randint(2, 24, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]


def serve(model, routings, items, **engine_args):
    engine = Engine(model, max_batch_size=8, **engine_args)
    engine.start()
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0)
        with engine_blocked(engine):  # queued together: they share prefills and steps
            handles = [engine.submit(GenerationRequest(f"t{i}", p, r, params))
                       for i, (p, r) in enumerate(zip(items, routings, strict=True))]
        return [h.wait(120) for h in handles]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("engine_args", [{}, {"mixed_steps": False}, {"max_step_tokens": 12}, {"deterministic": True}],
                         ids=["mixed", "separate-prefill", "chunked", "deterministic"])
def test_token_routed_requests_equal_generate_with_the_router(model, engine_args):
    items = prompts(16)
    routings = [RowRouting.routed() if i % 4 else RowRouting({"code": 0.6, "sql": 0.4}) for i in range(16)]
    served = serve(model, routings, items, **engine_args)
    for i, (completion, prompt, routing) in enumerate(zip(served, items, routings, strict=True)):
        expected = greedy_alone(model, prompt, "auto" if routing.auto else dict(routing.mixture), MAX_TOKENS)
        assert completion.token_ids == expected, f"request {i} ({'auto' if routing.auto else 'mixture'})"
        if routing.auto:  # reported: the router's average decision over the prompt
            assert set(completion.routing) <= set(ADAPTERS) and completion.routing


def test_the_token_router_really_switches_within_answers(model):
    """The control: pinning each request to its prompt's average decision (what the server did
    before) gives other answers, so the test above can fail."""
    items = prompts(16)
    differ = 0
    for prompt in items:
        pinned = model.route(torch.tensor([prompt]))[0]
        differ += greedy_alone(model, prompt, pinned, MAX_TOKENS) != greedy_alone(model, prompt, "auto", MAX_TOKENS)
    assert differ >= 4
