"""Streamed text equals the final text, token by token, with a tokenizer whose decoding is not
stable as it grows (SentencePiece-style: byte fallback, the first space stripped), and stop
strings cut the stream exactly where they cut the answer."""

from __future__ import annotations

import asyncio

import pytest

from moa.serve.engine import Engine
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
from tests.serve.helpers import routed_tiny_model
from tests.serve.test_detokenizer import sentencepiece_like, unstable_growth

PROMPTS = [[5, 9, 13, 2, 7], [40, 41], [3, 3, 3, 3, 3, 3], [100, 7, 19, 54], [72, 101, 108], [8, 8, 9],
           [200, 201, 202], [150, 151]]


@pytest.fixture(scope="module")
def model():
    tiny = routed_tiny_model({"sql": 4, "code": 8})
    tiny.tokenizer = sentencepiece_like()  # ids 0-257 are its specials and byte pieces
    return tiny


async def serve_streamed(engine: Engine, requests: list[GenerationRequest]) -> list[tuple[str, object]]:
    handles = [engine.submit(r) for r in requests]

    async def collect(handle):
        parts = [event.text async for event in handle.events()]
        return "".join(parts), await handle.result()

    return await asyncio.gather(*(collect(h) for h in handles))


@pytest.mark.parametrize("stop", [(), ("\x10",), ("a", "b c")])
def test_streamed_text_is_the_final_text(model, stop):
    engine = Engine(model, max_batch_size=8)
    engine.start()
    try:
        params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, stop=stop)
        requests = [GenerationRequest(f"s{i}", p, RowRouting({"sql": 1.0} if i % 2 else {}), params)
                    for i, p in enumerate(PROMPTS)]
        results = asyncio.run(serve_streamed(engine, requests))
    finally:
        engine.shutdown()
    unstable = 0
    for streamed, completion in results:
        assert streamed == completion.text
        assert not any(s in completion.text for s in stop)  # cut before the first stop string
        unstable += unstable_growth(model.tokenizer, [t for t in completion.token_ids if t != 256])
    if not stop:  # the control: these answers' one-shot decodes of growing prefixes do change
        assert unstable >= 1
