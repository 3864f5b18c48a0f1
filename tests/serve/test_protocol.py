"""The OpenAI request models and response builders, prompt formatting and the metrics
registry of ``moa serve``, without a server."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from pydantic import ValidationError  # noqa: E402

from moa.serve import protocol  # noqa: E402
from moa.serve.requests import BadRequestError, Completion  # noqa: E402

COMPLETION = Completion(text="hi", token_ids=[1, 2], finish_reason="length", routing={"sql": 0.75, "code": 0.25},
                        prompt_tokens=3, seconds_queued=0.01)


def test_completion_request_defaults_and_sampling_params():
    body = protocol.CompletionRequest.model_validate({"model": "sql", "prompt": "x", "stop": "\n",
                                                      "metadata": {"k": "v"}})
    params = body.sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.stop) == (16, 1.0, 1.0, ("\n",))
    assert body.prompts() == [protocol.Prompt("x", None)]
    ids = protocol.CompletionRequest.model_validate({"model": "sql", "prompt": [5, 6], "seed": 3})
    assert ids.prompts() == [protocol.Prompt(None, [5, 6])]
    assert ids.sampling_params().seed == 3
    with pytest.raises(BadRequestError, match="temperature"):
        protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": 2.5}).sampling_params()


@pytest.mark.parametrize("extra", [{"n": 0}, {"n": 129}, {"prompt": []}, {"prompt": [[1], []]}, {"logprobs": 21},
                                   {"best_of": 2}, {"suffix": "end"}, {"top_logprobs": 2}, {"unknown_field": 1},
                                   {"adapter_weights": {"a": float("nan")}},
                                   {"response_format": {"type": "json_schema"}},
                                   {"response_format": {"type": "regex", "regex": "a+"}}])
def test_completion_request_refuses_what_moa_cannot_honour(extra):
    with pytest.raises(ValidationError):
        protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x", **extra})


def test_completion_request_prompts_choices_and_logprobs():
    body = protocol.CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]], "n": 2, "echo": True,
                                                      "logprobs": 3, "best_of": 1, "frequency_penalty": 0.0})
    assert body.prompts() == [protocol.Prompt(None, [1, 2]), protocol.Prompt(None, [3])]
    params = body.sampling_params()
    assert (params.logprobs, params.prompt_logprobs) == (3, 3)
    assert protocol.CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompts() == [
        protocol.Prompt("a", None), protocol.Prompt("b", None)]
    no_echo = protocol.CompletionRequest.model_validate({"model": "m", "prompt": "a", "logprobs": 0}).sampling_params()
    assert (no_echo.logprobs, no_echo.prompt_logprobs) == (0, None)


@pytest.mark.parametrize("extra, field", [({"seed": 2**80}, "seed"), ({"seed": -(2**63) - 1}, "seed"),
                                          ({"temperature": 5e-324}, "temperature"),
                                          ({"temperature": 1e-7}, "temperature"),
                                          ({"temperature": float("nan")}, "temperature"),
                                          ({"stop": ["x"] * 17}, "stop")])
def test_values_that_could_only_overflow_are_refused_naming_the_field(extra, field):
    body = protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x", **extra})
    with pytest.raises(BadRequestError) as info:
        body.sampling_params()
    assert info.value.param == field and field in str(info.value)
    if field == "temperature" and extra[field] == 5e-324:
        assert "0 for greedy" in str(info.value) and "float32" in str(info.value)
    ok = protocol.CompletionRequest.model_validate({"model": "m", "prompt": "x", "seed": 2**63 - 1,
                                                    "temperature": 1e-4}).sampling_params()
    assert ok.seed == 2**63 - 1 and ok.for_choice(1).seed == -(2**63) and ok.for_choice(0) is ok


def test_chat_request_text_parts_and_max_completion_tokens():
    body = protocol.ChatCompletionRequest.model_validate({
        "model": "m", "max_completion_tokens": 7,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    })
    assert body.message_dicts() == [{"role": "user", "content": "ab"}]
    assert body.sampling_params().max_tokens == 7
    assert protocol.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}).sampling_params().max_tokens == \
        protocol.DEFAULT_CHAT_MAX_TOKENS
    for bad in ({"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
                {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True},
                {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
                {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}):
        with pytest.raises(ValidationError):
            protocol.ChatCompletionRequest.model_validate({"model": "m", **bad})


def test_chat_request_logprobs_and_assistant_turns_sent_back():
    body = protocol.ChatCompletionRequest.model_validate({
        "model": "m", "logprobs": True, "top_logprobs": 4,
        "messages": [{"role": "user", "content": "a"},
                     {"role": "assistant", "content": "b", "tool_calls": None, "refusal": None, "audio": None},
                     {"role": "user", "content": "c", "name": "ann"}]})
    assert body.sampling_params().logprobs == 4 and body.sampling_params().prompt_logprobs is None
    assert body.message_dicts()[1] == {"role": "assistant", "content": "b"}
    assert body.message_dicts()[2] == {"role": "user", "content": "c", "name": "ann"}
    plain = protocol.ChatCompletionRequest.model_validate({"model": "m", "logprobs": True,
                                                          "messages": [{"role": "user", "content": "a"}]})
    assert plain.sampling_params().logprobs == 0


def test_response_builders_have_openai_shape_and_moa_routing():
    from moa.serve import responses
    from moa.serve.delivery import Presentation, usage_of

    show = Presentation("completion", n=1, prompt_ids=[[1, 2, 3]], prompt_texts=["abc"])
    body = responses.response("cmpl-1", "completion", "sql", [show.choice(0, COMPLETION)],
                              usage_of([COMPLETION], 1), COMPLETION.routing, created=5)
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "sql",
                    "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                    "moa": {"routing": {"sql": 0.75, "code": 0.25}}}
    echo = Presentation("completion", n=2, prompt_ids=[[1, 2, 3]], prompt_texts=["abc"], echo=True)
    assert echo.choice(1, COMPLETION)["text"] == "abchi" and echo.prompt_of(1) == 0
    assert usage_of([COMPLETION, COMPLETION], 2) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    chat = responses.response("chatcmpl-1", "chat", "auto", [Presentation("chat").choice(0, COMPLETION)],
                              usage_of([COMPLETION], 1), COMPLETION.routing, created=5)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    chunk = responses.chat_chunk("chatcmpl-1", "auto", 5, {}, finish_reason="stop", routing=COMPLETION.routing)
    assert chunk["object"] == "chat.completion.chunk" and chunk["moa"]["routing"]["sql"] == 0.75
    assert "moa" not in responses.completion_chunk("cmpl-1", "sql", 5, "t")
    assert protocol.new_request_id("cmpl").startswith("cmpl-")
    assert protocol.error_body("boom", 429, code="overloaded") == {
        "error": {"message": "boom", "type": "rate_limit_exceeded", "param": None, "code": "overloaded"}}


def test_chat_text_matches_training_format_and_falls_back(tiny_model):
    from moa.data.chat import FALLBACK_TEMPLATE, chat_prompt
    from moa.serve.prompts import chat_prompt_ids, chat_text, completion_prompt_ids

    tokenizer = tiny_model.tokenizer  # no chat template: moa's fallback
    assert chat_text(tokenizer, [{"role": "user", "content": "q"}]) == chat_prompt(tokenizer, "q")
    assert chat_text(tokenizer, [{"role": "user", "content": "q"}]) == FALLBACK_TEMPLATE.format(prompt="q")
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}, {"role": "user", "content": "r"}]
    assert chat_text(tokenizer, turns) == "System: s\nUser: q\nAssistant: a\nUser: r\nAssistant: "
    assert chat_prompt_ids(tiny_model, turns) == tokenizer(chat_text(tokenizer, turns),
                                                           add_special_tokens=False)["input_ids"]
    assert completion_prompt_ids(tiny_model, None, [1, 2]) == [1, 2]
    with pytest.raises(BadRequestError, match="outside the vocabulary"):
        completion_prompt_ids(tiny_model, None, [999999])


def test_chat_text_uses_the_template_when_there_is_one(tiny_model):
    from moa.serve.prompts import chat_text

    tokenizer = tiny_model.tokenizer
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert chat_text(tokenizer, [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]) == \
        "<system>s<user>q<assistant>"


class _Engine:
    def __init__(self, running, waiting):
        self.split = (running, waiting)

    def stats(self):
        return {"queued": len(self.split[1]), "running": len(self.split[0]), "max_batch_size": 4, "steps": 0}

    def running_adapters(self):
        return self.split


def test_metrics_registries_are_separate_and_lora_info_has_one_series():
    from moa.serve.metrics import ServeMetrics, adapter_label

    first, second = ServeMetrics(max_loras=3), ServeMetrics(max_loras=3)  # no clash: own registries
    first.refresh(_Engine(["sql"], ["code", "icd"]), None)
    first.refresh(_Engine(["code", "sql"], []), None)
    lines = [line for line in first.render().decode().splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert lines == [lines[0]] and 'running_lora_adapters="code,sql"' in lines[0]
    assert 'max_lora="3"' in lines[0] and 'waiting_lora_adapters=""' in lines[0]
    second.observe_completion("sql", COMPLETION, seconds_total=0.5, seconds_to_first_token=0.1)
    text = second.render().decode()
    assert 'moa_requests_total{adapter="mixture",finish_reason="length",model="sql"} 1.0' in text
    assert "moa_requests_total{" not in first.render().decode().replace("# ", "")
    assert adapter_label({}) == "base" and adapter_label({"a": 1.0}) == "a" and adapter_label({"a": 1, "b": 0}) == "a"


def test_the_docs_list_every_field_moa_serve_accepts():
    from pathlib import Path

    from moa.serve.fields import DOCS_PAGE, INERT

    text = (Path(__file__).resolve().parents[2] / DOCS_PAGE).read_text()
    fields = {*INERT, *protocol.CompletionRequest.model_fields, *protocol.ChatCompletionRequest.model_fields}
    missing = sorted(name for name in fields if f"`{name}`" not in text)
    assert not missing, f"{DOCS_PAGE} does not list {missing}"
