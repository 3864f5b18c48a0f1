"""Chunked prefill: a prompt split over several steps, each chunk inside a mixed step beside the
running rows, ends with the keys/values and first-token logits of the prompt prefilled whole,
and the engine's answers equal ``model.generate`` of each request alone.

References on the tiny model with random adapters: each prompt prefilled alone in one forward.
Float sums of differently shaped forwards differ in the last bits, so values compare with a
float32 tolerance; the control shows a chunk that forgets its earlier chunks moves them far more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from moa.serve import mixed_step
from moa.serve.batch_cache import BatchCache, cache_argument
from moa.serve.engine import Engine
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
from moa.serve.rows import RowRoute
from moa.serve.scheduler import Chunk
from tests.serve.conftest import engine_blocked, wait_until
from tests.serve.helpers import greedy_alone, routed_tiny_model
from tests.serve.test_mixed_step import RUNNING, RUNNING_LAYERS, RUNNING_MIXTURES, prefill_alone

TOL = {"rtol": 1e-4, "atol": 1e-4}
LONG = torch.Generator().manual_seed(3)
PROMPT = torch.randint(0, 256, (41,), generator=LONG).tolist()


@pytest.fixture(scope="module")
def model():
    tiny = routed_tiny_model({"sql": 4, "code": 8, "french": 16})
    assert mixed_step.enable(tiny)
    return tiny


@dataclass(eq=False)
class ChunkedRow:
    """What a mixed step reads of a row being prefilled."""

    prefill_ids: list[int]
    route: RowRoute
    prompt_kv: list | None = None
    virtual: None = None
    prompt_logits: int = 1
    prefill_total: int = field(init=False)

    def __post_init__(self) -> None:
        self.prefill_total = len(self.prefill_ids)


@dataclass(eq=False)
class RunningRow:
    last_token: int
    position: int
    route: RowRoute


def running_rows():
    return [RunningRow(17 + i, len(p), RowRoute(m, layer))
            for i, (p, m, layer) in enumerate(zip(RUNNING, RUNNING_MIXTURES, RUNNING_LAYERS, strict=True))]


@pytest.mark.parametrize("sizes", [[41], [7, 7, 7, 7, 7, 6], [1, 30, 10], [20, 21]])
@pytest.mark.parametrize("mixture,layer", [({"code": 0.6, "french": 0.4}, 0), ({"sql": 1.0}, 2), (None, 0)])
def test_a_prompt_prefilled_in_chunks_equals_it_prefilled_whole(model, sizes, mixture, layer):
    whole_logits, whole_kv = prefill_alone(model, PROMPT, mixture, layer)
    batch = BatchCache.from_rows([prefill_alone(model, p, m, lay)[1]
                                  for p, m, lay in zip(RUNNING, RUNNING_MIXTURES, RUNNING_LAYERS, strict=True)])
    row = ChunkedRow(PROMPT, RowRoute(mixture, layer))
    start = 0
    with torch.no_grad():
        for size in sizes:
            chunk = Chunk(row, start, start + size)
            logits, kvs = mixed_step.run(model, batch, running_rows(), [chunk], cache_argument(model))
            row.prompt_kv, start = kvs[0], chunk.stop
    assert start == len(PROMPT)
    torch.testing.assert_close(logits[len(RUNNING)], whole_logits, **TOL)
    for (k, v), (wk, wv) in zip(row.prompt_kv, whole_kv, strict=True):
        torch.testing.assert_close(k, wk, **TOL)
        torch.testing.assert_close(v, wv, **TOL)


def test_a_chunk_without_its_earlier_chunks_is_far_off(model):
    whole_logits, _ = prefill_alone(model, PROMPT, None, 0)
    row = ChunkedRow(PROMPT, RowRoute(None, 0))
    with torch.no_grad():
        logits, _ = mixed_step.run(model, None, [], [Chunk(row, 0, len(PROMPT))], cache_argument(model))
        torch.testing.assert_close(logits[0], whole_logits, **TOL)  # whole, alone: the same
        forgetful = ChunkedRow(PROMPT[20:], RowRoute(None, 0))
        cut, _ = mixed_step.run(model, None, [], [Chunk(forgetful, 0, len(PROMPT) - 20)], cache_argument(model))
    assert (cut[0] - whole_logits).abs().max() > 100 * TOL["atol"]


def test_long_prompts_arriving_while_rows_run_are_chunked_and_answer_as_alone(model):
    engine = Engine(model, max_batch_size=8, max_step_tokens=12)
    engine.start()
    g = torch.Generator().manual_seed(9)
    longs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (45, 30, 60)]
    mixtures = [{"sql": 1.0}, {"code": 0.5, "french": 0.5}, None]

    def request(i, prompt, mixture, tokens):
        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0)
        return GenerationRequest(f"c{i}", prompt, RowRouting(mixture or {}), params)

    try:
        running = [engine.submit(request(i, p, m, 24)) for i, (p, m) in
                   enumerate(zip(RUNNING, RUNNING_MIXTURES, strict=True))]
        wait_until(lambda: engine.stats()["running"] == len(RUNNING), timeout=60, what="rows running")
        with engine_blocked(engine):
            arriving = [engine.submit(request(10 + i, p, m, 6)) for i, (p, m) in
                        enumerate(zip(longs, mixtures, strict=True))]
        for handle, prompt, mixture in zip(arriving, longs, mixtures, strict=True):
            assert handle.wait(120).token_ids == greedy_alone(model, prompt, mixture, 6)
        for handle, prompt, mixture in zip(running, RUNNING, RUNNING_MIXTURES, strict=True):
            assert handle.wait(120).token_ids == greedy_alone(model, prompt, mixture, 24)
        stats = engine.stats()
    finally:
        engine.shutdown()
    # 135 prompt tokens at <= 9 a step beside 3 running rows (then more as they finish): many chunks
    assert stats["prompt_chunks"] >= 135 // 9
