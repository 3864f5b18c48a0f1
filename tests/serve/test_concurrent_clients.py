"""Concurrent OpenAI clients share one continuously batched engine and get the offline answers.

16 clients at once over HTTP (real ``openai`` client, live uvicorn on 127.0.0.1), across five
adapters, the base, exact mixtures and ``auto``: every greedy answer equals offline
``model.generate`` of that request alone. A client that disconnects mid-stream frees its row.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moa.serve.prompts import completion_prompt_ids
from tests.serve.conftest import serving_stack

RANKS = {"sql": 4, "code": 8, "french": 16, "icd": 2, "math": 6}
MAX_TOKENS = 10
#: (model field, extra_body) per client: names, base, base:adapter, auto, exact mixtures.
REQUESTS = [
    ("sql", None), ("code", None), ("french", None), ("icd", None), ("math", None),
    ("tiny-base", None), ("tiny-base:code", None), ("auto", None), ("auto", None),
    ("tiny-base", {"adapter_weights": {"sql": 0.7, "code": 0.3}}),
    ("tiny-base", {"adapter_weights": {"french": 0.5, "icd": 0.25, "math": 0.25}}),
    ("math", None), ("auto", None), ("sql", None),
    ("tiny-base", {"adapter_weights": {"code": 1.0, "math": 0.5}}), ("icd", None),
]
PROMPTS = [f"request {i}: " + "abcdefghij"[: 3 + i % 7] * (1 + i % 3) for i in range(len(REQUESTS))]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with serving_stack(tmp_path_factory.mktemp("serve-concurrent"), ranks=RANKS, max_batch_size=16) as live:
        yield live


def offline(model, prompt: str, routing: dict[str, float], auto: bool) -> str:
    ids = torch.tensor([completion_prompt_ids(model, prompt, None)])
    kwargs = {"adapter_names": ["auto"]} if auto else {"adapter_weights": [routing or None]}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=257, eos_token_id=256, **kwargs)
    return model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_16_concurrent_clients_get_the_offline_answer(stack):
    assert len(REQUESTS) == 16
    answers: dict[int, tuple[str, dict]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(REQUESTS))

    def client(i: int) -> None:
        try:
            model_name, extra = REQUESTS[i]
            barrier.wait()
            response = stack.client().completions.create(
                model=model_name, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
            answers[i] = (response.choices[0].text, response.model_extra["moa"]["routing"])
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    steps_before = stack.engine.steps
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    # batched: one request after another would take ~16 x MAX_TOKENS decode steps
    assert 0 < stack.engine.steps - steps_before <= 4 * MAX_TOKENS
    for i, (model_name, extra) in enumerate(REQUESTS):
        text, routing = answers[i]
        auto = model_name == "auto"
        if extra:
            assert routing == pytest.approx(extra["adapter_weights"])
        elif not auto:
            name = model_name.split(":")[-1]
            assert routing == ({} if name == "tiny-base" else {name: 1.0})
        assert text == offline(stack.model, PROMPTS[i], routing, auto), (i, REQUESTS[i])


def test_a_client_that_disconnects_mid_stream_frees_its_row(stack):
    client = stack.client()
    stream = client.completions.create(model="sql", prompt="a long answer", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"min_tokens": 200})  # ~2-5 s of decoding
    chunks = iter(stream)
    texts = [next(chunks).choices[0].text for _ in range(3)]  # tokens are flowing
    assert all(t is not None for t in texts)
    assert stack.engine.stats()["running"] == 1
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while stack.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = stack.engine.stats()
    assert (stats["queued"], stats["running"], stats["max_batch_size"]) == (0, 0, 16)
    assert time.monotonic() < deadline  # it left well before its 200 tokens


def test_load_unload_and_evict_while_requests_run(tmp_path):
    """Adapter changes land between steps: running rows keep their answers, bit for bit."""
    with serving_stack(tmp_path, ranks=RANKS, router=False, max_loras=3, allow_runtime_loading=True,
                       resident=("sql", "code", "french"), max_batch_size=8) as live:
        expected = {name: offline(live.model, "long running " + name, {name: 1.0}, False) for name in ("sql", "code")}
        answers: dict[str, str] = {}

        def client(name: str) -> None:
            answers[name] = live.client().completions.create(
                model=name, prompt="long running " + name, max_tokens=MAX_TOKENS, temperature=0).choices[0].text

        threads = [threading.Thread(target=client, args=(name,)) for name in ("sql", "code")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while live.engine.stats()["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        changes = []
        client_ = live.client()
        # unload an idle adapter, load a new one, then name a registered one (evicts the LRU idle one)
        changes.append(client_.post("/unload_lora_adapter", body={"lora_name": "french"}, cast_to=object))
        changes.append(client_.post("/load_lora_adapter", body={"lora_name": "extra", "lora_path": str(live.folders["icd"])},
                                    cast_to=object))
        changes.append(client_.completions.create(model="math", prompt="x", max_tokens=2, temperature=0))
        for t in threads:
            t.join(60)
        assert answers == expected
        assert all(getattr(c, "get", lambda k: "ok")("status") == "ok" for c in changes[:2])
        assert "french" not in live.model.adapter_names and "math" in live.model.adapter_names
        assert len(live.model.adapter_names) <= 3
