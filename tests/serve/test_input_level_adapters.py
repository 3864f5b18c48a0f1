"""Input-level adapters (prompt / prefix tuning) on a live ``moa serve`` (tiny model, real ``openai`` client).

The server holds two prompt-tuning adapters of 3 virtual tokens, one of 5, a prefix-tuning adapter
of 4 (PEFT folders, loaded at start-up as ``--lora-modules`` loads them) and two LoRA adapters.
Requests naming each of them, the base and mixtures of an input-level adapter with a LoRA one
are sent while another request runs, so they are admitted together: in a mixed step (the
default), a packed prefill (``--separate-prefill``) or one by one (``--deterministic``), then
decoded in one batch. Every greedy answer must equal ``model.generate`` of that request alone,
which the plugin's own tests hold equal to PEFT. Then: streaming, log-probabilities against
``log_softmax`` of the offline logits, ``echo`` prompt log-probabilities (the real prompt tokens
only), refusals identical to ``model.forward``'s, loading / unloading at run time, and the
``moa serve`` command with a prompt-tuning folder in ``--lora-modules``.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest
import torch

from moa.testing import make_tiny_base, require_plugin
from tests.serve.conftest import engine_blocked, free_port, make_adapter_folders, serving_stack, wait_until
from tests.serve.test_logprobs import check_step, offline_prompt_logprobs, offline_steps, token_id

moa_prompt_tuning = require_plugin("moa-prompt-tuning", "moa_prompt_tuning")
peft = pytest.importorskip("peft")
openai = pytest.importorskip("openai")

RANKS = {"sql": 4, "code": 8}
MAX_TOKENS = 8
LONG_TOKENS = 40
#: (model field, extra_body) of the requests admitted together.
REQUESTS = [
    ("pt3", None),
    ("pt5", None),
    ("prefix4", None),
    ("sql", None),
    ("tiny-base", None),
    ("tiny-base:pt3b", None),
    ("tiny-base", {"adapter_weights": {"pt5": 1.0, "sql": 0.5}}),
    ("tiny-base", {"adapter_weights": {"prefix4": 2.0, "code": 1.0}}),
    ("tiny-base", {"adapter_weights": {"pt3": 3.0, "pt3b": 2.0, "code": 0.5}}),
]
PROMPTS = [f"request {i}: " + "abcdefghij"[: 2 + i % 5] * (1 + i % 3) for i in range(len(REQUESTS))]


def peft_folders(root, base_factory) -> dict:
    """PEFT prompt-tuning (3, 3, 5 virtual tokens) and prefix-tuning (4) folders for the tiny base."""
    configs = {
        "pt3": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "pt3b": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "pt5": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "prefix4": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    folders = {}
    for seed, (name, config) in enumerate(configs.items()):
        base = base_factory()
        torch.manual_seed(100 + seed)
        peft.get_peft_model(base, config).save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="module")
def input_folders(tmp_path_factory):
    return peft_folders(tmp_path_factory.mktemp("serve-input-level"), make_tiny_base)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, input_folders):
    with serving_stack(tmp_path_factory.mktemp("serve-input-stack"), router=False, ranks=RANKS,
                       input_folders=input_folders, max_batch_size=16, allow_runtime_loading=True) as live:
        yield live


def mixture_of(model_name: str, extra: dict | None) -> dict[str, float]:
    if extra:
        return dict(extra["adapter_weights"])
    name = model_name.split(":")[-1]
    return {} if name == "tiny-base" else {name: 1.0}


def offline(model, prompt_ids: list[int], mixture: dict[str, float], max_tokens: int = MAX_TOKENS,
            min_tokens: int = 0) -> str:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=min_tokens, do_sample=False, pad_token_id=257, eos_token_id=256,
                             adapter_weights=[mixture or None])
    return model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def prompt_ids(stack, text: str) -> list[int]:
    return stack.model.tokenizer(text)["input_ids"]


def serve_together(live) -> tuple[list, str, dict, dict]:
    """A long request runs; the others are queued while the engine is held, then admitted together."""
    client = live.client(timeout=120)
    engine = live.engine
    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS) + 1) as pool:
        long = pool.submit(lambda: client.completions.create(
            model="pt5", prompt="a long one", max_tokens=LONG_TOKENS, temperature=0,
            extra_body={"min_tokens": LONG_TOKENS}).choices[0].text)
        wait_until(lambda: engine.stats()["steps"] >= 1, timeout=30, what="the long request decoding")
        before = engine.stats()
        with engine_blocked(engine):
            futures = [pool.submit(client.completions.create, model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                   temperature=0, extra_body=extra)
                       for (name, extra), prompt in zip(REQUESTS, PROMPTS, strict=True)]
            wait_until(lambda: engine.stats()["queued"] == len(REQUESTS), timeout=30, what="queued requests")
        answers = [f.result(timeout=120) for f in futures]
        after = engine.stats()
        long_text = long.result(timeout=120)
    return answers, long_text, before, after


def check_answers(live, answers, long_text) -> None:
    model = live.model
    for i, ((name, extra), prompt) in enumerate(zip(REQUESTS, PROMPTS, strict=True)):
        mixture = mixture_of(name, extra)
        response = answers[i]
        assert response.model_extra["moa"]["routing"] == pytest.approx(mixture), i
        assert response.choices[0].text == offline(model, prompt_ids(live, prompt), mixture), (i, name, extra)
    assert long_text == offline(model, prompt_ids(live, "a long one"), {"pt5": 1.0}, LONG_TOKENS, LONG_TOKENS)


#: Requests with a prefix-tuning adapter among REQUESTS (each is prefilled alone).
PREFIX_ROWS = sum(1 for name, extra in REQUESTS if "prefix4" in mixture_of(name, extra))


@pytest.mark.parametrize("mode", ["mixed", "separate-prefill", "deterministic"])
def test_every_kind_of_row_admitted_together_answers_as_generate_alone(tmp_path, input_folders, mode):
    # a step budget that holds every queued prompt, so they share one mixed step (not chunks of it)
    options = {"mixed": {"max_step_tokens": 4096}, "separate-prefill": {"mixed_steps": False},
               "deterministic": {"deterministic": True}}
    with serving_stack(tmp_path, router=False, ranks=RANKS, input_folders=input_folders, max_batch_size=16,
                       engine_options=options[mode]) as live:
        answers, long_text, before, after = serve_together(live)
        check_answers(live, answers, long_text)
    assert after["prefilled_requests"] - before["prefilled_requests"] == len(REQUESTS)
    forwards = after["prefill_forwards"] - before["prefill_forwards"]
    mixed_steps = after["mixed_steps"] - before["mixed_steps"]
    if mode == "deterministic":
        assert forwards == len(REQUESTS) and mixed_steps == 0
    else:  # the rows without a prefix in one forward (a mixed step, or a packed prefill), each prefix row alone
        assert forwards == 1 + PREFIX_ROWS
        assert mixed_steps == (1 if mode == "mixed" else 0)


def test_streamed_chat_answers_equal_generate(stack):
    from moa.serve.prompts import chat_prompt_ids

    messages = [{"role": "user", "content": "Write the query"}]
    for name in ("pt5", "prefix4"):
        stream = stack.client().chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS,
                                                        temperature=0, stream=True)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == offline(stack.model, chat_prompt_ids(stack.model, messages), {name: 1.0}), name


def test_logprobs_of_input_level_rows_equal_log_softmax_of_generate(stack):
    client = stack.client()
    for mixture in ({"pt3": 1.0}, {"prefix4": 1.0}, {"pt5": 1.0, "sql": 0.5}):
        response = client.completions.create(model="tiny-base", prompt="SELECT name", max_tokens=6, temperature=0,
                                             logprobs=5, extra_body={"adapter_weights": mixture,
                                                                     "return_tokens_as_token_ids": True})
        logprobs = response.choices[0].logprobs
        tokens, reference = offline_steps(stack.model, prompt_ids(stack, "SELECT name"), 6,
                                          adapter_weights=[mixture])
        assert [token_id(t) for t in logprobs.tokens] == tokens[:len(logprobs.tokens)], mixture
        for step, (token, logprob, top) in enumerate(zip(logprobs.tokens, logprobs.token_logprobs,
                                                         logprobs.top_logprobs, strict=True)):
            alternatives = sorted(((token_id(t), lp) for t, lp in top.items()), key=lambda p: -p[1])
            check_step(reference[step], token_id(token), logprob, alternatives)


def test_echo_prompt_logprobs_cover_the_real_prompt_tokens_only(stack):
    prompt = [72, 101, 108, 108, 111, 32, 119]
    for name in ("pt5", "prefix4"):
        response = stack.client().completions.create(model=name, prompt=[prompt], max_tokens=1, temperature=0,
                                                     logprobs=1, echo=True,
                                                     extra_body={"return_tokens_as_token_ids": True})
        logprobs = response.choices[0].logprobs
        assert response.usage.prompt_tokens == len(prompt)
        assert len(logprobs.tokens) == len(prompt) + 1  # the prompt, then the generated token: no virtual ones
        assert [token_id(t) for t in logprobs.tokens[:len(prompt)]] == prompt
        assert logprobs.token_logprobs[0] is None
        reference = offline_prompt_logprobs(stack.model, prompt, adapter_names=[name])
        base = offline_prompt_logprobs(stack.model, prompt, adapter_names=[None])
        assert not torch.allclose(reference, base, atol=1e-3)  # the adapter shows in the numbers
        for i in range(1, len(prompt)):
            assert logprobs.token_logprobs[i] == pytest.approx(float(reference[i - 1, prompt[i]]), abs=1e-4)


def test_n_choices_of_a_prefix_row_share_its_prefill(stack):
    response = stack.client().completions.create(model="prefix4", prompt="same prompt", max_tokens=MAX_TOKENS,
                                                 temperature=0, n=2)
    expected = offline(stack.model, prompt_ids(stack, "same prompt"), {"prefix4": 1.0})
    assert [c.text for c in response.choices] == [expected, expected]


@pytest.mark.parametrize(
    "weights",
    [{"pt3": 1.0, "pt5": 1.0}, {"prefix4": 1.0, "pt3": 1.0}, {"prefix4": 1.0, "pt3": 0.0, "sql": 1.0, "pt5": 1.0}],
)
def test_mixtures_the_model_refuses_are_refused_with_its_message(stack, weights):
    from moa.errors import RoutingError

    ids = torch.tensor([prompt_ids(stack, "refuse me")])
    with pytest.raises(RoutingError) as refused:
        stack.model(ids, adapter_weights=[weights])
    with pytest.raises(openai.BadRequestError) as answer:
        stack.client().completions.create(model="tiny-base", prompt="refuse me", max_tokens=2, temperature=0,
                                          extra_body={"adapter_weights": weights})
    assert answer.value.status_code == 400
    assert answer.value.body["message"] == str(refused.value)
    assert stack.engine.stats()["queued"] == 0 and stack.engine.stats()["running"] == 0


def test_virtual_positions_count_towards_the_context(stack):
    prompt = [65] * 90  # 90 + 166 = 256, the tiny base's context; 5 virtual tokens make it 261
    with pytest.raises(openai.BadRequestError, match="and 5 virtual positions of its adapter"):
        stack.client().completions.create(model="pt5", prompt=[prompt], max_tokens=166, temperature=0)


def test_load_list_serve_and_unload_an_input_level_adapter_at_run_time(stack, input_folders):
    client = stack.client()
    loaded = client.post("/load_lora_adapter", body={"lora_name": "late", "lora_path": str(input_folders["pt5"])},
                         cast_to=object)
    assert loaded["status"] == "ok"
    assert "late" in stack.model.input_adapters and "late" not in stack.model.bank.names
    cards = {m.id: m for m in client.models.list().data}
    assert {"pt3", "pt3b", "pt5", "prefix4", "late", "sql", "code"} <= set(cards)
    assert cards["late"].model_extra["moa"]["source"] == str(input_folders["pt5"])
    text = client.completions.create(model="late", prompt="late adapter", max_tokens=MAX_TOKENS,
                                     temperature=0).choices[0].text
    expected = offline(stack.model, prompt_ids(stack, "late adapter"), {"pt5": 1.0})
    assert text == expected == offline(stack.model, prompt_ids(stack, "late adapter"), {"late": 1.0})
    mixed = client.completions.create(model="tiny-base", prompt="late adapter", max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"adapter_weights": {"late": 1.0, "code": 1.0}})
    assert mixed.choices[0].text == offline(stack.model, prompt_ids(stack, "late adapter"), {"late": 1.0, "code": 1.0})
    assert client.post("/unload_lora_adapter", body={"lora_name": "late"}, cast_to=object)["status"] == "ok"
    assert "late" not in stack.model.adapter_names and "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="gone", max_tokens=2, temperature=0)


def test_unloading_an_input_level_adapter_in_use_is_refused(stack):
    client = stack.client()
    engine = stack.engine
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with engine_blocked(engine):
            pending = pool.submit(client.completions.create, model="prefix4", prompt="busy", max_tokens=2,
                                  temperature=0)
            wait_until(lambda: engine.stats()["queued"] == 1, what="the queued request")
            with pytest.raises(openai.ConflictError):
                client.post("/unload_lora_adapter", body={"lora_name": "prefix4"}, cast_to=object)
        assert pending.result(timeout=60).choices[0].text == offline(stack.model, prompt_ids(stack, "busy"),
                                                                     {"prefix4": 1.0}, 2)


def test_the_serve_command_loads_prompt_tuning_folders_from_lora_modules(tiny_base_dir, tmp_path):
    from moa.cli import build_parser
    from moa.commands.serve import build_server
    from moa.testing import load_tiny_base

    folders = {**peft_folders(tmp_path / "input", lambda: load_tiny_base(tiny_base_dir)),
               **make_adapter_folders(tmp_path, {"a": 2})}
    port = free_port()
    args = build_parser().parse_args([
        "serve", "--base", str(tiny_base_dir), "--quantization", "none", "--no-router", "--port", str(port),
        "--lora-modules", *(f"{n}={folders[n]}" for n in ("pt5", "prefix4", "a")), "--served-model-name", "tiny",
        "--log-level", "warning",
    ])
    server, engine, app = build_server(args)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        model = app.state.model
        assert set(model.input_adapters.names) == {"pt5", "prefix4"} and model.bank.names == ("a",)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        assert {m.id for m in client.models.list().data} == {"tiny", "pt5", "prefix4", "a"}
        for name in ("pt5", "prefix4"):
            text = client.completions.create(model=name, prompt="from the command line", max_tokens=MAX_TOKENS,
                                             temperature=0).choices[0].text
            ids = model.tokenizer("from the command line")["input_ids"]
            assert text == offline(model, ids, {name: 1.0}), name
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown(timeout=5)


def test_input_level_adapters_are_evicted_and_loaded_again(tmp_path, input_folders):
    with serving_stack(tmp_path, router=False, ranks={"sql": 4}, max_loras=2,
                       input_folders={"pt3": input_folders["pt3"]}) as live:
        live.cache.register("pt5", str(input_folders["pt5"]), startup=True)  # known, not resident
        client = live.client()
        for name in ("pt5", "pt3", "sql", "pt5"):  # each one evicts the least recently used
            text = client.completions.create(model=name, prompt="evict", max_tokens=4, temperature=0).choices[0].text
            assert text == offline(live.model, prompt_ids(live, "evict"), {name: 1.0}, 4), name
            assert name in live.model.adapter_names and len(live.model.adapter_names) == 2
        assert live.cache.evictions == 3
