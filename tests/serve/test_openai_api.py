"""``moa serve`` through the real ``openai`` client: completions, chat, streaming, models,
routing (named, base:adapter, auto, adapter_weights), errors in OpenAI's shape, API key,
/health and /metrics. One live server (tests/serve/conftest.py: main_stack) for the module."""

from __future__ import annotations

import json

import pytest
import torch

from tests.serve.conftest import API_KEY, GATE_ADAPTERS, wait_until

openai = pytest.importorskip("openai")

PROMPT = "SELECT name FROM"


def offline_text(stack, prompt_ids: list[int], max_tokens: int, **routing) -> str:
    """Greedy ``model.generate`` of one request alone, decoded as the server decodes it."""
    model = stack.model
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=model.tokenizer.pad_token_id, **routing)
    new = [t for t in out[0, len(prompt_ids):].tolist()]
    eos = model.tokenizer.eos_token_id
    if eos in new:
        new = new[: new.index(eos)]
    return model.tokenizer.decode(new, skip_special_tokens=True)


def completion_ids(stack, prompt: str) -> list[int]:
    return stack.model.tokenizer(prompt)["input_ids"]


# -- completions and chat ----------------------------------------------------------------------


def test_completion_named_adapter_matches_offline_generate(main_stack):
    client = main_stack.client()
    response = client.completions.create(model="sql", prompt=PROMPT, max_tokens=6, temperature=0)
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert response.model == "sql"
    choice = response.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert choice.text == offline_text(main_stack, completion_ids(main_stack, PROMPT), 6, adapter_names=["sql"])
    assert response.usage.prompt_tokens == len(completion_ids(main_stack, PROMPT))
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.model_extra["moa"] == {"routing": {"sql": 1.0}}


def test_base_and_base_colon_adapter(main_stack):
    client = main_stack.client()
    base = client.completions.create(model="tiny-base", prompt=[PROMPT], max_tokens=5, temperature=0)
    assert base.model_extra["moa"]["routing"] == {}
    expected = offline_text(main_stack, completion_ids(main_stack, PROMPT), 5, adapter_names=[None])
    assert base.choices[0].text == expected
    qualified = client.completions.create(model="tiny-base:code", prompt=PROMPT, max_tokens=5, temperature=0)
    named = client.completions.create(model="code", prompt=PROMPT, max_tokens=5, temperature=0)
    assert qualified.model_extra["moa"]["routing"] == {"code": 1.0}
    assert qualified.choices[0].text == named.choices[0].text


def test_adapter_weights_extension_overrides_model(main_stack):
    client = main_stack.client()
    mixture = {"sql": 0.7, "code": 0.3}
    response = client.completions.create(model="icd", prompt=PROMPT, max_tokens=6, temperature=0,
                                         extra_body={"adapter_weights": mixture})
    assert response.model_extra["moa"]["routing"] == pytest.approx(mixture)
    expected = offline_text(main_stack, completion_ids(main_stack, PROMPT), 6, adapter_weights=[mixture])
    assert response.choices[0].text == expected


def test_chat_uses_template_and_auto_routes_with_the_gate(main_stack):
    client = main_stack.client()
    messages = [{"role": "user", "content": "List the customers from Berlin"}]
    response = client.chat.completions.create(model="auto", messages=messages, max_tokens=5, temperature=0)
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.choices[0].message.role == "assistant"
    routing = response.model_extra["moa"]["routing"]
    assert routing and set(routing) <= set(GATE_ADAPTERS)
    from moa.data.chat import encode_prompts

    ids = encode_prompts(main_stack.model.tokenizer, [messages[0]["content"]])["input_ids"]
    assert response.usage.prompt_tokens == ids.shape[1]
    expected = main_stack.model.route(ids)[0]
    assert routing == pytest.approx(expected, abs=1e-5)


def test_chat_multi_turn_and_system_message(main_stack):
    client = main_stack.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    response = client.chat.completions.create(model="french", messages=messages, max_tokens=3, temperature=0,
                                              seed=1)
    assert response.choices[0].finish_reason in ("length", "stop")
    assert response.model_extra["moa"]["routing"] == {"french": 1.0}


# -- streaming -------------------------------------------------------------------------------


def test_stream_completion_chunks_join_to_the_non_streamed_text(main_stack):
    client = main_stack.client()
    whole = client.completions.create(model="code", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model="code", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].model_extra["moa"] == {"routing": {"code": 1.0}}


def test_stream_chat_role_first_usage_last(main_stack):
    client = main_stack.client()
    stream = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    final = chunks[-2]
    assert final.choices[0].finish_reason in ("length", "stop")
    assert final.model_extra["moa"] == {"routing": {"sql": 1.0}}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, temperature=0)
    assert text == whole.choices[0].message.content


def test_stream_wire_format_is_data_lines_and_done(main_stack):
    status, headers, body = main_stack.http(
        "POST", "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 3, "temperature": 0,
                                    "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert "moa" in json.loads(events[-3][len("data: "):])


# -- models ----------------------------------------------------------------------------------


def test_models_lists_base_auto_and_adapters_with_parent(main_stack):
    models = {m.id: m for m in main_stack.client().models.list()}
    assert set(models) == {"tiny-base", "auto", "sql", "code", "french", "icd"}
    for name in ("sql", "code", "french", "icd", "auto"):
        assert models[name].model_extra["parent"] == "tiny-base"
    assert models["tiny-base"].model_extra["parent"] is None
    assert main_stack.client().models.retrieve("code").id == "code"


# -- errors ----------------------------------------------------------------------------------


def test_unknown_model_is_404_listing_choices(main_stack):
    client = main_stack.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    error = info.value.body
    assert "sql" in error["message"] and "tiny-base" in error["message"]
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other-base:sql", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="tiny-base", prompt="x", max_tokens=2,
                                  extra_body={"adapter_weights": {"sql": 0.5, "ghost": 0.5}})
    assert "ghost" in info.value.body["message"] and "icd" in info.value.body["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": "sql", "prompt": "x", "n": 0}, "n"),
    ({"model": "sql", "prompt": "x", "n": 9}, "n"),  # more than the server's batch (8)
    ({"model": "sql"}, "prompt"),
    ({"model": "sql", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "sql", "prompt": []}, "prompt"),
    ({"model": "sql", "prompt": [[1, 2], []]}, "prompt"),
    ({"model": "sql", "prompt": "x", "temperature": 3.5}, "temperature"),
    ({"model": "sql", "prompt": "x", "logprobs": 21}, "logprobs"),
    ({"model": "sql", "prompt": "x", "adapter_weights": {"sql": -1}}, "adapter_weights"),
    ({"model": "sql", "prompt": "x", "adapter_weights": {"sql": 0.0}}, None),
])
def test_bad_bodies_are_400_in_openai_shape(main_stack, body, param):
    status, _, raw = main_stack.http("POST", "/v1/completions", body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_invalid_json_and_unknown_fields(main_stack):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    status, _, raw = main_stack.http("POST", "/v1/completions", raw=b"{not json", headers=auth)
    error = json.loads(raw)["error"]
    assert status == 400 and "not valid JSON at character 1" in error["message"] and error["param"] is None
    status, _, raw = main_stack.http("POST", "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 1,
                                                                  "frequency_penalty": 0, "tools": None},
                                     headers=auth)
    assert status == 200, raw  # OpenAI's fields at their neutral values, null ones: nothing is asked
    status, _, raw = main_stack.http("POST", "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 1,
                                                                  "whatever": [1]}, headers=auth)
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "whatever" and "whatever" in error["message"]


def test_prompt_too_long_is_400(main_stack):
    with pytest.raises(openai.BadRequestError) as info:
        main_stack.client().completions.create(model="sql", prompt="y" * 200, max_tokens=2)
    assert "tokens" in info.value.body["message"]


def test_body_over_the_cap_is_413(main_stack):
    with pytest.raises(openai.APIStatusError) as info:
        main_stack.client().completions.create(model="sql", prompt="z" * 20000, max_tokens=2)
    assert info.value.status_code == 413
    assert "limit" in info.value.body["message"]


def test_api_key_required_on_v1_only(main_stack):
    with pytest.raises(openai.AuthenticationError) as info:
        main_stack.client(api_key="wrong").completions.create(model="sql", prompt="x", max_tokens=1)
    assert info.value.body["code"] == "invalid_api_key"
    status, _, _ = main_stack.http("GET", "/v1/models")
    assert status == 401
    assert main_stack.http("GET", "/health")[0] == 200
    assert main_stack.http("GET", "/metrics")[0] == 200


def test_runtime_loading_disabled_is_404(main_stack):
    client = main_stack.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": str(main_stack.folders["sql"])},
                    cast_to=object)
    assert "--allow-runtime-loading" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.post("/unload_lora_adapter", body={"lora_name": "sql"}, cast_to=object)


# -- health and metrics ----------------------------------------------------------------------


def test_health_ok(main_stack):
    status, _, body = main_stack.http("GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_metrics_expose_requests_and_vllm_lora_info(main_stack):
    client = main_stack.client()
    client.completions.create(model="icd", prompt="x", max_tokens=2, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    # The answer may reach the client a moment before the engine drops the finished row.
    wait_until(lambda: main_stack.engine.stats()["running"] == 0, what="the engine to go idle")
    status, headers, body = main_stack.http("GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "# TYPE vllm:lora_requests_info gauge" in text
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1
    assert 'max_lora="4"' in info[0] and 'running_lora_adapters=""' in info[0] and 'waiting_lora_adapters=""' in info[0]
    assert float(info[0].rsplit(" ", 1)[1]) > 1.6e9  # a Unix timestamp, as vLLM sets it
    assert 'moa_requests_total{adapter="icd",finish_reason=' in text
    assert 'moa_adapter_requests_total{adapter="icd"}' in text
    assert 'moa_request_errors_total{status="404"}' in text
    assert "moa_generation_tokens_total" in text and "moa_prompt_tokens_total" in text
    assert "moa_time_to_first_token_seconds_bucket" in text and "moa_e2e_request_latency_seconds_count" in text
    assert "moa_request_queue_time_seconds_count" in text
    assert 'moa_adapter_load_seconds{adapter="sql"}' in text
    assert "vllm:num_requests_waiting 0.0" in text and "moa_num_requests_running 0.0" in text
    busy = [line for line in text.splitlines() if line.startswith("moa_engine_busy_seconds ")]
    assert len(busy) == 1 and float(busy[0].split()[1]) > 0  # requests ran before this scrape
