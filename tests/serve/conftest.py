"""A live ``moa serve`` stack for the serving tests: tiny model, real engine, uvicorn on 127.0.0.1.

:func:`serving_stack` builds everything in-process: a tiny random MixtureModel
(``moa.testing.fixtures.make_tiny_model``), random LoRA adapters of different ranks saved
as PEFT folders and loaded through the :class:`AdapterCache` (so they have sources and can
be evicted and reloaded), optionally a :class:`LearnedGate` with a random head as router,
the engine thread, and the app served by ``uvicorn.Server`` in a background thread on a
free port. Start-up and shut-down are bounded (``STARTUP_TIMEOUT`` / ``STOP_TIMEOUT``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
#: name -> rank of the random adapters every stack offers (different ranks on purpose).
ADAPTER_RANKS = {"sql": 4, "code": 8, "french": 16, "icd": 2}
#: The adapters the random gate routes among.
GATE_ADAPTERS = ("sql", "code", "french")
API_KEY = "test-key"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_adapter_folders(root: Path, ranks: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Random (non-zero) LoRA adapters of the given ranks, saved as PEFT folders under ``root``."""
    import moa
    from moa.testing.fixtures import make_tiny_model

    torch.manual_seed(seed)
    maker = make_tiny_model()
    folders = {}
    for name, rank in ranks.items():
        maker.add_adapter(name, moa.LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                               target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        # Scale B up so every adapter visibly changes greedy answers of the tiny model.
        with torch.no_grad():
            for layer in maker.adapter_layers(name).values():
                for pname, param in layer.named_parameters():
                    if pname.startswith("lora_B"):
                        param.mul_(4.0)
        folders[name] = root / name
        maker.save_adapter(name, folders[name])
    return folders


@dataclass
class Stack:
    """One live server and what it serves."""

    model: Any
    engine: Any
    cache: Any
    app: Any
    server: Any
    thread: threading.Thread
    port: int
    folders: dict[str, Path]
    api_key: str | None = None
    served_model_name: str = "tiny-base"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str | None = None, timeout: float = 30.0) -> Any:
        """An ``openai.OpenAI`` client for this server (no retries)."""
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key or self.api_key or "unused",
                             max_retries=0, timeout=timeout)

    def http(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """A plain HTTP call: ``(status, headers, body bytes)`` (errors included)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


def _gate(hidden_size: int, seed: int) -> Any:
    from moa.routing.learned_gate import LearnedGate

    torch.manual_seed(seed)
    gate = LearnedGate(list(GATE_ADAPTERS), hidden_size=hidden_size, hidden_layer=1, mlp_hidden=16, top_k=2)
    with torch.no_grad():  # a random head with confident, prompt-dependent decisions
        for param in gate.head.parameters():
            param.normal_(0, 1.0)
    return gate.eval()


@contextlib.contextmanager
def serving_stack(
    root: Path,
    *,
    router: bool = True,
    api_key: str | None = None,
    max_loras: int | None = None,
    max_queue: int = 64,
    max_batch_size: int = 8,
    max_prompt_tokens: int | None = 96,
    max_request_bytes: int = 16384,
    allow_runtime_loading: bool = False,
    resident: tuple[str, ...] | None = None,
    ranks: dict[str, int] | None = None,
    input_folders: dict[str, Path] | None = None,
    engine_options: dict[str, Any] | None = None,
) -> Iterator[Stack]:
    """Start a live server; stop it (and its engine) on exit.

    Args:
        root: Folder for the adapter folders.
        router: Set a random :class:`LearnedGate` over :data:`GATE_ADAPTERS` (pinned).
        resident: Adapters loaded at start (default: all); the others are registered only.
        ranks: Adapters to create (default :data:`ADAPTER_RANKS`).
        input_folders: More adapter folders (prompt / prefix tuning...) loaded at start, by name.
        engine_options: More :class:`Engine` arguments (``deterministic``, ``mixed_steps``...).
    """
    import uvicorn

    from moa.serve.adapter_cache import AdapterCache
    from moa.serve.app import create_app
    from moa.serve.engine import Engine
    from moa.testing.fixtures import make_tiny_model

    ranks = dict(ADAPTER_RANKS if ranks is None else ranks)
    folders = make_adapter_folders(root, ranks)
    model = make_tiny_model()
    engine = Engine(model, max_batch_size=max_batch_size, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                    **(engine_options or {}))
    gate = _gate(model.config.hidden_size, seed=3) if router else None
    cache = AdapterCache(engine, model, max_loras=max_loras, allow_runtime_loading=allow_runtime_loading,
                         pinned=set(GATE_ADAPTERS) if router else set())
    wanted = tuple(ranks) if resident is None else resident
    for name in ranks:
        if name in wanted:
            cache.load(name, str(folders[name]), startup=True)
        else:
            cache.register(name, str(folders[name]), startup=True)
    for name, folder in (input_folders or {}).items():
        cache.load(name, str(folder), startup=True)
        folders[name] = folder
    if gate is not None:
        model.set_router(gate)
    engine.start()
    app = create_app(engine, model, cache, served_model_name="tiny-base", api_key=api_key,
                     max_request_bytes=max_request_bytes, allow_runtime_loading=allow_runtime_loading)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            engine.shutdown(timeout=STOP_TIMEOUT, cancel=True)
            raise RuntimeError(f"uvicorn did not start on port {port} within {STARTUP_TIMEOUT} s.")
        time.sleep(0.02)
    stack = Stack(model, engine, cache, app, server, thread, port, folders, api_key=api_key)
    try:
        yield stack
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        engine.shutdown(timeout=STOP_TIMEOUT, cancel=True)


@pytest.fixture(scope="module")
def main_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Four adapters (ranks 2-16), the random gate, an API key; runtime loading off."""
    with serving_stack(tmp_path_factory.mktemp("serve-main"), api_key=API_KEY) as stack:
        yield stack


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """No router, ``max_loras=2`` (sql, code resident; french, icd registered), ``max_queue=1``,
    runtime loading on, no API key."""
    with serving_stack(tmp_path_factory.mktemp("serve-small"), router=False, max_loras=2, max_queue=1,
                       allow_runtime_loading=True, resident=("sql", "code")) as stack:
        yield stack


@contextlib.contextmanager
def engine_blocked(engine: Any, timeout: float = 20.0) -> Iterator[threading.Event]:
    """Hold the engine thread inside an admin call (no step runs) until the block exits."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(timeout)

    thread = threading.Thread(target=engine.call, args=(hold,), daemon=True)
    thread.start()
    if not entered.wait(timeout):
        raise RuntimeError("The engine thread did not pick up the blocking call.")
    try:
        yield release
    finally:
        release.set()
        thread.join(timeout)


def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")
        time.sleep(0.01)
