"""Log-probabilities, ``echo``, ``n`` and several prompts on a live ``moa serve`` (tiny model).

Every log-probability is compared with an independent offline computation on the same
model: ``torch.log_softmax`` of ``model.generate``'s raw logits (``output_logits``) for
generated tokens, of a plain forward's logits for prompt tokens, each under the row's own
routing (a named adapter, a weighted mixture, ``auto``), in float32 to 1e-4.
"""

from __future__ import annotations

import concurrent.futures
import json

import pytest
import torch

from tests.serve.conftest import API_KEY, engine_blocked, wait_until

openai = pytest.importorskip("openai")

TOL = 1e-4
K = 5
PROMPT = "SELECT name FROM"
MIXTURE = {"sql": 0.6, "code": 0.4}


def token_id(text: str) -> int:
    assert text.startswith("token_id:"), text
    return int(text.removeprefix("token_id:"))


def offline_steps(model, prompt_ids: list[int], max_tokens: int, **routing) -> tuple[list[int], torch.Tensor]:
    """Greedy ``generate`` alone: its tokens and the log-softmax of its raw logits per step."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True,
                         pad_token_id=model.tokenizer.pad_token_id, **routing)
    logprobs = torch.log_softmax(torch.stack([step[0] for step in out.logits]).float(), dim=-1)
    return out.sequences[0, len(prompt_ids):].tolist(), logprobs


def offline_prompt_logprobs(model, prompt_ids: list[int], **routing) -> torch.Tensor:
    """``log_softmax`` of a plain forward over the prompt, ``[len - 1, vocab]`` (position i scores i + 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids]), **routing).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def check_step(reference: torch.Tensor, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
    """One position: the chosen token's log-probability and the top-k equal the offline ones."""
    assert logprob == pytest.approx(float(reference[token]), abs=TOL)
    values, ids = torch.topk(reference, len(top))
    assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=TOL)
    for (tid, lp), expected in zip(top, ids.tolist(), strict=True):
        assert tid == expected or lp == pytest.approx(float(reference[expected]), abs=TOL)  # ties may swap


def completion_ids(stack, prompt: str) -> list[int]:
    return stack.model.tokenizer(prompt)["input_ids"]


def test_top_logprobs_equal_offline_for_named_weighted_and_auto_rows_in_one_batch(main_stack):
    """Three requests admitted together (one packed prefill), decoded in one batch: each row's
    generated tokens, log-probabilities and top-5 equal ``generate`` of that request alone."""
    from moa.serve.prompts import chat_prompt_ids

    client = main_stack.client()
    engine = main_stack.engine
    messages = [{"role": "user", "content": "List the customers from Berlin"}]
    calls = {
        "named": lambda: client.chat.completions.create(
            model="sql", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=K,
            extra_body={"return_tokens_as_token_ids": True}),
        "weighted": lambda: client.completions.create(
            model="tiny-base", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=K,
            extra_body={"adapter_weights": MIXTURE, "return_tokens_as_token_ids": True}),
        "auto": lambda: client.completions.create(
            model="auto", prompt="a b c d", max_tokens=6, temperature=0, logprobs=K,
            extra_body={"return_tokens_as_token_ids": True}),
    }
    before = engine.stats()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        with engine_blocked(engine):
            futures = {name: pool.submit(call) for name, call in calls.items()}
            wait_until(lambda: engine.stats()["queued"] == 3, what="three queued requests")
        answers = {name: future.result(timeout=60) for name, future in futures.items()}
    after = engine.stats()
    assert after["prefill_forwards"] - before["prefill_forwards"] == 1  # one packed prefill for all three
    assert after["prefilled_requests"] - before["prefilled_requests"] == 3

    model = main_stack.model
    chat = answers["named"].choices[0].logprobs.content
    tokens, reference = offline_steps(model, chat_prompt_ids(model, messages), 6, adapter_names=["sql"])
    assert [token_id(e.token) for e in chat] == tokens[:len(chat)]
    for step, entry in enumerate(chat):
        assert len(entry.top_logprobs) == K
        check_step(reference[step], token_id(entry.token), entry.logprob,
                   [(token_id(t.token), t.logprob) for t in entry.top_logprobs])
    for name, routing, prompt in (("weighted", {"adapter_weights": [MIXTURE]}, PROMPT),
                                  ("auto", {"adapter_names": ["auto"]}, "a b c d")):
        logprobs = answers[name].choices[0].logprobs
        tokens, reference = offline_steps(model, completion_ids(main_stack, prompt), 6, **routing)
        assert [token_id(t) for t in logprobs.tokens] == tokens[:len(logprobs.tokens)], name
        for step, (token, logprob, top) in enumerate(zip(logprobs.tokens, logprobs.token_logprobs,
                                                         logprobs.top_logprobs, strict=True)):
            chosen = token_id(token)
            alternatives = sorted(((token_id(t), lp) for t, lp in top.items()), key=lambda p: -p[1])
            assert len(alternatives) == K and alternatives[0][0] == chosen  # greedy: the chosen one is the best
            check_step(reference[step], chosen, logprob, alternatives)


def test_echo_prompt_logprobs_equal_offline_forward_for_several_prompts(main_stack):
    """``echo`` + ``logprobs`` with two token-id prompts (lm-eval's scoring request): each
    prompt token's log-probability equals a plain forward's, per routing."""
    client = main_stack.client()
    prompts = [[72, 101, 108, 108, 111, 32, 119], [83, 69, 76, 69, 67, 84]]
    for model_name, routing in (("code", {"adapter_names": ["code"]}), ("auto", {"adapter_names": ["auto"]})):
        response = client.completions.create(model=model_name, prompt=prompts, max_tokens=1, temperature=0,
                                             logprobs=1, echo=True, seed=1234,
                                             extra_body={"return_tokens_as_token_ids": True})
        assert [c.index for c in response.choices] == [0, 1]
        assert response.usage.prompt_tokens == sum(map(len, prompts))
        for choice, prompt in zip(response.choices, prompts, strict=True):
            logprobs = choice.logprobs
            assert [token_id(t) for t in logprobs.tokens[:len(prompt)]] == prompt
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            assert len(logprobs.tokens) == len(prompt) + 1  # the prompt, then the one generated token
            reference = offline_prompt_logprobs(main_stack.model, prompt, **routing)
            base = offline_prompt_logprobs(main_stack.model, prompt, adapter_names=[None])
            assert not torch.allclose(reference, base, atol=1e-3)  # the routing shows in the numbers
            for i in range(1, len(prompt)):
                assert logprobs.token_logprobs[i] == pytest.approx(float(reference[i - 1, prompt[i]]), abs=TOL)
                best = int(reference[i - 1].argmax())
                assert logprobs.top_logprobs[i][f"token_id:{best}"] == pytest.approx(
                    float(reference[i - 1, best]), abs=TOL)
            assert choice.text.startswith(main_stack.model.tokenizer.decode(prompt))


def test_logprob_tokens_as_text_and_offsets(main_stack):
    response = main_stack.client().completions.create(model="sql", prompt="hello", max_tokens=5, temperature=0,
                                                      logprobs=2, echo=True)
    logprobs = response.choices[0].logprobs
    assert "".join(logprobs.tokens).startswith("hello")
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert all(len(top) in (2, 3) for top in logprobs.top_logprobs[1:])  # k alternatives and the chosen one
    one = main_stack.client().completions.create(model="sql", prompt=[[72]], max_tokens=1, temperature=0,
                                                 logprobs=0, echo=True).choices[0].logprobs
    assert one.token_logprobs[0] is None and len(one.token_logprobs) == 2  # lm-eval reads [ctxlen:-1]


def test_n_choices_share_one_prefill_and_sample_with_seed_plus_index(main_stack):
    client = main_stack.client()
    engine = main_stack.engine
    before = engine.stats()
    many = client.completions.create(model="french", prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=3,
                                     logprobs=0)
    after = engine.stats()
    assert after["prefilled_requests"] - before["prefilled_requests"] == 1  # three choices, one prefill
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in many.choices)
    for index, choice in enumerate(many.choices):
        alone = client.completions.create(model="french", prompt=PROMPT, max_tokens=6, temperature=1.0,
                                          seed=7 + index, logprobs=0)
        assert choice.text == alone.choices[0].text
        assert choice.logprobs.token_logprobs == pytest.approx(alone.choices[0].logprobs.token_logprobs, abs=TOL)
    assert len({c.text for c in many.choices}) > 1  # different seeds, different samples
    greedy = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "hi"}], n=2,
                                            max_tokens=4, temperature=0)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.model_extra["moa"] == {"routing": {"sql": 1.0}}
    assert all(c.model_extra["moa"] == {"routing": {"sql": 1.0}} for c in greedy.choices)


def test_several_prompts_times_n_are_indexed_prompt_major(main_stack):
    client = main_stack.client()
    prompts = ["SELECT", "hello there"]
    both = client.completions.create(model="code", prompt=prompts, n=2, max_tokens=4, temperature=0)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(model="code", prompt=prompt, max_tokens=4, temperature=0)
        assert both.choices[2 * i].text == both.choices[2 * i + 1].text == alone.choices[0].text
    assert both.usage.prompt_tokens == sum(len(completion_ids(main_stack, p)) for p in prompts)


def test_streamed_logprobs_join_to_the_non_streamed_ones(main_stack):
    client = main_stack.client()
    kwargs = dict(model="icd", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs is not None]
    assert sum((lp.tokens for lp in streamed), []) == whole.logprobs.tokens
    assert sum((lp.token_logprobs for lp in streamed), []) == whole.logprobs.token_logprobs
    assert sum((lp.text_offset for lp in streamed), []) == whole.logprobs.text_offset

    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="sql", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=3, n=2)
    stream = list(client.chat.completions.create(model="sql", messages=messages, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=3, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in stream if c.choices and c.choices[0].index == index]
        entries = [e for c in mine if c.logprobs for e in c.logprobs.content]
        assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob)
                                                           for e in chat.choices[index].logprobs.content]
        assert "".join(c.delta.content or "" for c in mine) == chat.choices[index].message.content
        assert mine[-1].finish_reason == chat.choices[index].finish_reason
    assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens


# -- fields moa serve refuses --------------------------------------------------------------------

#: A value each inert field is refused at (every entry of moa.serve.fields.INERT that can be refused).
REFUSED = {
    "best_of": 2, "suffix": "tail", "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto", "functions": [{"name": "f"}], "function_call": "auto", "frequency_penalty": 0.5,
    "presence_penalty": -1, "repetition_penalty": 1.2, "logit_bias": {"5": 10}, "top_k": 5, "min_p": 0.1,
    "ignore_eos": True, "include_stop_str_in_output": True, "skip_special_tokens": False,
    "spaces_between_special_tokens": False, "echo": True, "add_generation_prompt": False,
    "continue_final_message": True, "chat_template": "{{ messages }}", "chat_template_kwargs": {"a": 1},
    "truncate_prompt_tokens": 5, "modalities": ["text", "audio"], "audio": {"voice": "x"},
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low", "web_search_options": {},
    "store": True, "priority": 1, "guided_json": {"type": "object"}, "guided_regex": "a+",
    "guided_choice": ["a"], "guided_grammar": "x", "guided_decoding_backend": "xgrammar",
    "structured_outputs": {"json": {}},
}


def test_every_refusable_field_has_a_refused_value_here():
    from moa.serve.fields import INERT

    refusable = {name for name, (accepts, _) in INERT.items() if not accepts(object())}
    assert refusable == set(REFUSED)


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field", sorted(REFUSED) + ["not_a_field", "seed", "temperature"])
def test_unsupported_fields_get_a_400_naming_them(main_stack, endpoint, field):
    value = {"not_a_field": 1, "seed": 2**80, "temperature": 5e-324}.get(field, REFUSED.get(field))
    if endpoint == "/v1/completions" and field == "echo":
        pytest.skip("echo is honoured on /v1/completions")
    body = {"model": "sql", "max_tokens": 2, field: value}
    body.update({"prompt": "x"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    status, _, raw = main_stack.http("POST", endpoint, body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert status == 400, raw
    error = json.loads(raw)["error"]
    assert error["param"] == field and field in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_neutral_values_of_inert_fields_are_accepted(main_stack):
    client = main_stack.client()
    response = client.chat.completions.create(
        model="sql", messages=[{"role": "user", "content": "x"}], max_tokens=2, temperature=0, frequency_penalty=0,
        presence_penalty=0, logit_bias={}, tool_choice="none", parallel_tool_calls=False, store=False,
        metadata={"run": "1"}, extra_body={"top_k": -1, "repetition_penalty": 1.0, "skip_special_tokens": True})
    assert response.choices[0].finish_reason in ("stop", "length")
