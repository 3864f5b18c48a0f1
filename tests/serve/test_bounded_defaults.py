"""``moa serve`` bounded by default: ``--max-loras`` sized from memory, prompts tokenized off the event loop."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import urllib.request

import pytest

import moa
from moa.serve import lora_budget
from tests.serve.conftest import make_adapter_folders, serving_stack

BOUND = 60.0  # seconds: only stops a broken server from hanging the test

# -- the sizing function -----------------------------------------------------------------------


def test_default_max_loras_fits_a_share_of_free_memory():
    mib = 1 << 20
    share, factor = lora_budget.ADAPTER_MEMORY_SHARE, lora_budget.ADAPTER_COST_FACTOR
    # 10 adapters' worth of the memory share
    free = int(10 * factor * 8 * mib / share)
    assert lora_budget.default_max_loras(free, 8 * mib) == 10
    assert lora_budget.default_max_loras(free, 16 * mib) == 5  # twice as large: half as many
    assert lora_budget.default_max_loras(free, 8 * mib, cap=4) == 4
    assert lora_budget.default_max_loras(free, 8 * mib, floor=12) == 12  # room beside the pinned ones
    assert lora_budget.default_max_loras(1 * mib, 8 * mib) == 1  # never below one
    assert lora_budget.default_max_loras(1 << 50, 1) == lora_budget.DEFAULT_MAX_LORAS_CAP  # the sane cap
    assert lora_budget.default_max_loras(None, 8 * mib) == lora_budget.DEFAULT_MAX_LORAS_CAP  # unknown memory
    assert lora_budget.default_max_loras(free, 0) == lora_budget.DEFAULT_MAX_LORAS_CAP  # no adapter known


def test_available_memory_reads_the_host_with_and_without_psutil(monkeypatch):
    with_psutil = lora_budget.available_memory_bytes("cpu")
    assert with_psutil is not None and with_psutil > 0
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    from_proc = lora_budget.available_memory_bytes("cpu")
    assert from_proc is not None and from_proc > 0
    assert abs(from_proc - with_psutil) < max(with_psutil, from_proc) // 2  # the same figure, give or take use


def test_resident_adapter_bytes_counts_the_adapters_weights():
    from moa.testing.fixtures import make_tiny_model

    model = make_tiny_model()
    model.add_adapter("a", moa.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    expected = sum((4 * layer.in_features + layer.out_features * 4) * 4 for layer in model.bank.layers()
                   if "a" in layer.adapters)
    assert expected > 0 and lora_budget.resident_adapter_bytes(model, "a") == expected


def test_the_cache_sizes_itself_from_memory_and_keeps_room_beside_pinned(monkeypatch, tmp_path, caplog):
    from moa.serve.adapter_cache import AdapterCache
    from moa.serve.engine import Engine
    from moa.testing.fixtures import make_tiny_model

    folders = make_adapter_folders(tmp_path, {"small": 2, "big": 16})
    model = make_tiny_model()
    cache = AdapterCache(Engine(model), model, pinned={"small"})
    cache.load("small", str(folders["small"]), startup=True)
    big_file = lora_budget.weight_file_bytes(folders["big"])
    assert big_file > lora_budget.resident_adapter_bytes(model, "small")
    free = int(7 * lora_budget.ADAPTER_COST_FACTOR * big_file / lora_budget.ADAPTER_MEMORY_SHARE)
    monkeypatch.setattr(lora_budget, "available_memory_bytes", lambda device=None: free)
    with caplog.at_level(logging.INFO, logger="moa.serve.adapter_cache"):
        assert cache.size_from_memory([str(folders["big"])]) == 7  # sized from the largest: "big", not loaded
    assert cache.max_loras == 7 and "max_loras=7" in caplog.text
    monkeypatch.setattr(lora_budget, "available_memory_bytes", lambda device=None: 1)
    assert cache.size_from_memory() == 2  # the pinned one plus room for one more


# -- the command line --------------------------------------------------------------------------


def test_max_loras_option_accepts_a_count_or_no_limit():
    from moa.cli import build_parser
    from moa.commands.serve import max_loras_arg

    assert [max_loras_arg(v) for v in ("3", "0", "none", "Unlimited")] == [3, 0, 0, 0]
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            max_loras_arg(bad)
    parser = build_parser()
    assert parser.parse_args(["serve"]).max_loras is None  # not given: sized from memory
    assert parser.parse_args(["serve", "--max-loras", "none"]).max_loras == 0
    sub = next(a for a in parser._actions if a.dest == "command")
    text = " ".join(sub.choices["serve"].format_help().split())
    assert "sized from the memory free at start" in text and "'none': no limit" in text


@pytest.mark.parametrize(("option", "resident", "limit"), [(None, {"a", "b"}, 2), ("0", {"a", "b", "c"}, None)])
def test_build_server_sizes_max_loras_unless_given(tiny_base_dir, tmp_path, monkeypatch, caplog, option, resident,
                                                     limit):
    from moa.cli import build_parser
    from moa.commands.serve import build_server

    monkeypatch.setattr(lora_budget, "DEFAULT_MAX_LORAS_CAP", 2)  # as if memory allowed only two
    folders = make_adapter_folders(tmp_path, {"a": 2, "b": 4, "c": 8})
    args = build_parser().parse_args([
        "serve", "--base", str(tiny_base_dir), "--quantization", "none", "--no-router", "--port", "0",
        "--lora-modules", *(f"{n}={p}" for n, p in folders.items()),
        *(["--max-loras", option] if option is not None else []),
    ])
    with caplog.at_level(logging.INFO, logger="moa.serve.adapter_cache"):
        server, engine, app = build_server(args)
    try:
        cache = app.state.adapter_cache
        assert set(cache.resident()) == resident and cache.max_loras == limit
        assert cache.registered() == ["a", "b", "c"]
        assert ("max_loras=2 (not given: sized from" in caplog.text) == (option is None)
    finally:
        engine.shutdown(timeout=5)


# -- tokenization off the event loop -----------------------------------------------------------


class BlockingTokenizer:
    """The real tokenizer, held at each call until released; records the calling thread."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.threads: list[threading.Thread] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.threads.append(threading.current_thread())
        self.entered.set()
        self.release.wait(BOUND)
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_a_huge_prompt_is_tokenized_off_the_event_loop(tmp_path, endpoint):
    from moa.serve.app import TOKENIZER_THREAD_PREFIX

    huge = "moa " * (1 << 18)  # 1 MiB of text
    body = {"model": "tiny-base", "max_tokens": 1}
    body.update({"prompt": huge} if endpoint == "completions" else {"messages": [{"role": "user", "content": huge}]})
    with serving_stack(tmp_path, router=False, ranks={"sql": 4}, max_request_bytes=2 << 20) as stack:
        tokenizer = BlockingTokenizer(stack.model.tokenizer)
        stack.model.tokenizer = tokenizer
        answer: list[int] = []

        def post() -> None:
            answer.append(stack.http("POST", f"/v1/{endpoint}", body)[0])

        client = threading.Thread(target=post, daemon=True)
        client.start()
        try:
            assert tokenizer.entered.wait(BOUND), "the request never reached the tokenizer"
            # the tokenizer is held: were it on the event loop, /health could not answer now
            with urllib.request.urlopen(f"{stack.base_url}/health", timeout=10) as response:
                assert response.status == 200 and json.loads(response.read())["status"] == "ok"
        finally:
            tokenizer.release.set()
            client.join(BOUND)
            stack.model.tokenizer = tokenizer.inner
        assert answer and answer[0] in (200, 400)  # 400: longer than this test server's max_prompt_tokens
        assert tokenizer.threads and all(t.name.startswith(TOKENIZER_THREAD_PREFIX) for t in tokenizer.threads)
        assert all(t is not stack.thread for t in tokenizer.threads)

