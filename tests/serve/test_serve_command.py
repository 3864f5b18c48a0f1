"""The ``moa serve`` command: its options, its wiring, and a graceful SIGTERM in a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.serve.conftest import free_port, make_adapter_folders

pytest.importorskip("uvicorn")


def test_help_lists_every_option():
    from moa.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["serve"].format_help()
    for option in ("--base", "--quantization", "--host", "--port", "--served-model-name", "--lora-modules",
                   "--no-router", "--max-batch-size", "--max-queue", "--max-loras", "--allow-runtime-loading",
                   "--api-key", "--deterministic", "--max-prompt-tokens", "--max-request-bytes",
                   "--shutdown-timeout"):
        assert option in text


def test_parse_lora_modules_and_defaults():
    from moa.commands.serve import MAX_REQUEST_BYTES
    from moa.serve.launch import default_modules, parse_lora_modules
    from moa.errors import AdapterFormatError
    from moa.serve.app import DEFAULT_MAX_REQUEST_BYTES

    assert parse_lora_modules(["a=./x", "b=alice/b@v1"]) == {"a": "./x", "b": "alice/b@v1"}
    for bad in (["a"], ["=x"], ["a=x", "a=y"]):
        with pytest.raises(AdapterFormatError):
            parse_lora_modules(bad)
    modules, router = default_modules()
    assert set(modules) == {"sql", "code", "french", "icd", "arithmetic"}
    assert (router / "router_config.json").is_file()
    assert MAX_REQUEST_BYTES == DEFAULT_MAX_REQUEST_BYTES


def test_build_server_wires_the_stack(tiny_base_dir, tmp_path):
    from moa.cli import build_parser
    from moa.commands.serve import build_server

    folders = make_adapter_folders(tmp_path, {"a": 2, "b": 4, "c": 8})
    args = build_parser().parse_args([
        "serve", "--base", str(tiny_base_dir), "--quantization", "none", "--no-router", "--max-loras", "2",
        "--lora-modules", *(f"{n}={p}" for n, p in folders.items()), "--served-model-name", "tiny",
        "--max-batch-size", "3", "--max-queue", "5", "--port", "0",
    ])
    server, engine, app = build_server(args)
    try:
        assert engine.alive and engine.max_batch_size == 3 and engine.max_queue == 5
        cache = app.state.adapter_cache
        assert set(cache.resident()) == {"a", "b"} and cache.registered() == ["a", "b", "c"]
        assert app.state.names.choices() == ["tiny", "a", "b", "c"]
        assert server.config.timeout_graceful_shutdown == 30.0
    finally:
        engine.shutdown(timeout=5)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except OSError:
        return 0


def test_sigterm_lets_the_in_flight_stream_finish(tiny_base_dir, tmp_path):
    folders = make_adapter_folders(tmp_path, {"a": 4})
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "moa.cli", "serve", "--base", str(tiny_base_dir), "--quantization", "none",
         "--no-router", "--lora-modules", f"a={folders['a']}", "--port", str(port), "--log-level", "warning",
         "--shutdown-timeout", "20"],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "moa serve did not come up within 60 s"
            time.sleep(0.2)
        body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 24,
                           "temperature": 0, "stream": True}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            first = response.readline()  # the role chunk, sent before any token
            assert first.startswith(b"data: {")
            process.send_signal(signal.SIGTERM)  # mid-request
            rest = response.read().decode()
        events = [e for e in (first.decode() + rest).split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] in ("length", "stop")  # finished, not cancelled
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
