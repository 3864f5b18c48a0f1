"""``response_format`` (``json_object``, ``json_schema``) on ``moa serve``: every constrained
answer parses and validates (``jsonschema``), constrained and free rows share a batch and
the free ones answer exactly as alone; the row's mask is checked token by token against
llguidance's own verdict; on the default base (integration), >= 19 of 20 prompts validate."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch

from tests.serve.conftest import API_KEY, engine_blocked, wait_until

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "city": {"enum": ["Paris", "Rome", "Berlin"]},
    },
    "required": ["name", "age", "ok", "city"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}


def offline_text(model, prompt_ids: list[int], max_tokens: int, **routing) -> str:
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=model.tokenizer.pad_token_id, **routing)
    new = out[0, len(prompt_ids):].tolist()
    eos = model.tokenizer.eos_token_id
    return model.tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)


def test_guide_mask_allows_exactly_what_the_grammar_accepts(tiny_model):
    from moa.serve.rows import eos_ids
    from moa.serve.structured import StructuredOutput

    outputs = StructuredOutput(tiny_model.tokenizer, tiny_model.config.vocab_size, eos_ids(tiny_model))
    guide = outputs.guide(outputs.grammar(FORMAT))
    text = json.dumps({"name": "ab", "age": 7, "ok": True, "city": "Rome"}, separators=(",", ":"))
    for token in tiny_model.tokenizer(text)["input_ids"]:
        allowed = guide.allowed()
        verdict = torch.tensor([guide.matcher.validate_tokens([t]) == 1 for t in range(allowed.shape[0])])
        assert torch.equal(allowed, verdict)  # llguidance's own token-by-token check
        masked = guide.mask(torch.zeros(allowed.shape[0]))
        assert torch.equal(torch.isfinite(masked), allowed) and bool(allowed[token])
        guide.advance(token)
    assert guide.allowed().nonzero().flatten().tolist() == sorted(eos_ids(tiny_model))  # complete: EOS only


def test_json_schema_and_json_object_answers_validate(main_stack):
    client = main_stack.client(timeout=180)
    for model_name in ("sql", "auto", "tiny-base"):
        response = client.completions.create(model=model_name, prompt="Person:", max_tokens=72, temperature=0.8,
                                             seed=3, extra_body={"response_format": FORMAT})
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    # json_object: any object (the random tiny model, sampling, closes it at once with these seeds)
    chat = client.chat.completions.create(model="code", messages=[{"role": "user", "content": "JSON please"}],
                                          max_tokens=64, temperature=1.0, seed=0,
                                          response_format={"type": "json_object"}, n=2)
    for choice in chat.choices:
        assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict)
    stream = client.chat.completions.create(model="code", messages=[{"role": "user", "content": "JSON please"}],
                                            max_tokens=64, temperature=1.0, seed=0,
                                            response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content


def test_constrained_and_free_rows_share_a_batch_and_free_rows_answer_as_alone(main_stack):
    client = main_stack.client(timeout=180)
    engine = main_stack.engine
    free_prompts = ["SELECT name FROM", "hello world", "a b c"]

    def constrained(seed: int):
        return client.completions.create(model="french", prompt="Person:", max_tokens=72, temperature=1.0, seed=seed,
                                         extra_body={"response_format": FORMAT})

    def free(prompt: str):
        return client.completions.create(model="sql", prompt=prompt, max_tokens=12, temperature=0)

    before = engine.stats()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        with engine_blocked(engine):
            jobs = [pool.submit(constrained, s) for s in (1, 2, 3)] + [pool.submit(free, p) for p in free_prompts]
            wait_until(lambda: engine.stats()["queued"] == 6, what="six queued requests")
        answers = [job.result(timeout=120) for job in jobs]
    assert engine.stats()["prefill_forwards"] - before["prefill_forwards"] == 1  # one packed prefill
    for response in answers[:3]:
        jsonschema.validate(json.loads(response.choices[0].text), SCHEMA)
    model = main_stack.model
    for prompt, response in zip(free_prompts, answers[3:], strict=True):
        ids = model.tokenizer(prompt)["input_ids"]
        assert response.choices[0].text == offline_text(model, ids, 12, adapter_names=["sql"])


@pytest.mark.parametrize("response_format, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}, "frob"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "nowhere"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "regex"}, "json_schema"),
])
def test_bad_response_formats_are_400_naming_response_format(main_stack, response_format, needle):
    status, _, raw = main_stack.http("POST", "/v1/chat/completions",
                                     {"model": "sql", "messages": [{"role": "user", "content": "x"}],
                                      "response_format": response_format},
                                     headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == "response_format" and needle in error["message"], error


# -- the default base (SmolLM2-135M-Instruct), bounded -------------------------------------------

TOPICS = ["a baker", "a pilot", "a nurse", "a farmer", "a painter", "a student", "a chef", "a teacher",
          "a doctor", "a singer", "a poet", "a judge", "a sailor", "a miner", "a tailor", "a writer",
          "a dancer", "a driver", "a banker", "a gardener"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 18, "maximum": 90},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome", "Madrid"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.mark.integration
def test_default_base_json_schema_validates_and_free_rows_answer_as_alone():
    from moa import MixtureModel
    from moa.serve.engine import Engine
    from moa.serve.prompts import chat_prompt_ids
    from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams
    from moa.serve.rows import eos_ids
    from moa.serve.structured import StructuredOutput

    model = MixtureModel.from_pretrained("default")
    outputs = StructuredOutput(model.tokenizer, model.config.vocab_size, eos_ids(model))
    grammar = outputs.grammar({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    free_prompts = ["What is the capital of France?", "Name three colors."]
    constrained = [GenerationRequest(f"json{i}", chat_prompt_ids(model, [{"role": "user", "content":
                   f"Describe {topic} as JSON with a name, an age and a city."}]), RowRouting(),
                   SamplingParams(max_tokens=40, temperature=0), guide=outputs.guide(grammar))
                   for i, topic in enumerate(TOPICS)]
    free = [GenerationRequest(f"free{i}", chat_prompt_ids(model, [{"role": "user", "content": p}]), RowRouting(),
                              SamplingParams(max_tokens=12, temperature=0)) for i, p in enumerate(free_prompts)]
    engine = Engine(model, max_batch_size=len(constrained) + len(free))
    engine.start()
    try:
        with engine_blocked(engine):
            handles = [engine.submit(r) for r in [*free, *constrained]]
        completions = [h.wait(600) for h in handles]
        alone = [engine.submit(r).wait(600).text for r in free]
    finally:
        engine.shutdown()
    valid = 0
    for completion in completions[len(free):]:
        try:
            jsonschema.validate(json.loads(completion.text), PERSON)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    assert valid >= 19, [c.text for c in completions[len(free):]]
    assert [c.text for c in completions[:len(free)]] == alone
