"""Prefix caching keyed by routing: blocks found only under the same routing, the longest chain
leaving the last token, LRU eviction by bytes; in the engine, a repeated prefix is not prefilled
again and every answer still equals ``model.generate`` of the request alone."""

from __future__ import annotations

import pytest
import torch

from moa.serve.engine import Engine
from moa.serve.prefix_cache import PrefixCache, routing_key
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
from tests.serve.conftest import make_adapter_folders
from tests.serve.helpers import greedy_alone, routed_tiny_model

LAYERS, HEADS, DIM = 3, 2, 4


def fake_kv(tokens):
    """Per layer (keys, values) whose entries encode (layer, position, token): checkable slices."""
    t = torch.tensor(tokens, dtype=torch.float32)
    return [(t.view(1, 1, -1, 1).expand(1, HEADS, -1, DIM) + 1000 * layer,
             -t.view(1, 1, -1, 1).expand(1, HEADS, -1, DIM) - 1000 * layer) for layer in range(LAYERS)]


def test_the_longest_chain_of_whole_blocks_is_found_leaving_the_last_token():
    cache = PrefixCache(capacity_bytes=10**9, block_size=4)
    prompt = list(range(10, 22))  # 12 tokens: 3 blocks
    key = routing_key({"sql": 1.0}, 0)
    cache.insert(prompt, key, fake_kv(prompt))
    found, kv = cache.lookup(prompt, key)
    assert found == 8  # 3 blocks cached, but the last token must be computed: 2 blocks
    for layer, (k, v) in enumerate(kv):
        torch.testing.assert_close(k, fake_kv(prompt[:8])[layer][0])
        torch.testing.assert_close(v, fake_kv(prompt[:8])[layer][1])
    assert cache.lookup(prompt + [5, 6], key)[0] == 12
    assert cache.lookup(prompt[:4] + [99] + prompt[5:], key)[0] == 4  # a change ends the chain
    assert cache.lookup([1] + prompt[1:], key)[0] == 0  # a block's key covers every token before it


def test_blocks_are_reused_only_under_the_same_routing():
    cache = PrefixCache(capacity_bytes=10**9, block_size=4)
    prompt = list(range(9))
    cache.insert(prompt, routing_key({"sql": 1.0}, 0), fake_kv(prompt))
    assert cache.lookup(prompt, routing_key({"sql": 1.0}, 0))[0] == 8
    assert cache.lookup(prompt, routing_key({"sql": 0.5}, 0))[0] == 0
    assert cache.lookup(prompt, routing_key({"sql": 1.0}, 2))[0] == 0
    assert cache.lookup(prompt, routing_key(None, 0))[0] == 0
    assert routing_key({"a": 0.3, "b": 0.7}, 0) == routing_key({"b": 0.7, "a": 0.3}, 0)


def test_least_recently_used_blocks_go_beyond_the_capacity():
    block_bytes = LAYERS * 2 * HEADS * 4 * DIM * 4
    cache = PrefixCache(capacity_bytes=3 * block_bytes, block_size=4)
    a, b = list(range(0, 9)), list(range(100, 109))
    key = routing_key(None, 0)
    cache.insert(a, key, fake_kv(a))
    cache.insert(b, key, fake_kv(b))  # 4 blocks > 3: a's first block (the oldest) goes
    assert len(cache) == 3 and cache.bytes == 3 * block_bytes
    assert cache.lookup(a, key)[0] == 0  # its chain starts with the evicted block
    assert cache.lookup(b, key)[0] == 8
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


@pytest.fixture(scope="module")
def model():
    return routed_tiny_model({"sql": 4, "code": 8})


def request(i, prompt, mixture, tokens=6):
    return GenerationRequest(f"p{i}", prompt, RowRouting(mixture or {}),
                             SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0))


def test_a_repeated_prefix_is_not_prefilled_again_and_answers_are_unchanged(model):
    g = torch.Generator().manual_seed(4)
    system = torch.randint(0, 256, (40,), generator=g).tolist()
    questions = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 3, 12)]
    mixtures = [{"sql": 1.0}, {"sql": 1.0}, {"code": 0.5, "sql": 0.5}, {"sql": 1.0}]
    engine = Engine(model, max_batch_size=4)
    engine.start()
    try:
        answers = []
        for i, (q, m) in enumerate(zip(questions, mixtures, strict=True)):  # one after another
            answers.append(engine.submit(request(i, system + q, m)).wait(60).token_ids)
            if i == 0:
                assert engine.stats()["prefix_cache_hits"] == 0
        stats = engine.stats()
    finally:
        engine.shutdown()
    for answer, q, m in zip(answers, questions, mixtures, strict=True):
        assert answer == greedy_alone(model, system + q, m, 6)
    # the second and fourth (same routing as the first) reuse the 32 tokens of whole blocks in the
    # system prefix; the third (another mixture) reuses nothing
    assert stats["prefix_cache_hits"] == 2 * 32
    assert stats["prefix_cache_blocks"] > 0


def test_changing_the_adapters_clears_the_cache(tmp_path):
    model = routed_tiny_model({"code": 8})
    prompt = list(range(50, 90))
    engine = Engine(model, max_batch_size=4)
    engine.start()
    try:
        engine.submit(request(0, prompt, {"code": 1.0})).wait(60)
        assert engine.stats()["prefix_cache_blocks"] > 0
        folder = make_adapter_folders(tmp_path, {"code": 8}, seed=7)["code"]
        engine.call(lambda: (model.delete_adapter("code"), model.load_adapter(folder, adapter_name="code")))
        engine.submit(request(1, prompt, {"code": 1.0})).wait(60)
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert stats["prefix_cache_hits"] == 0  # the reloaded adapter's keys/values were computed anew
