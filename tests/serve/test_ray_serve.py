"""``moa serve`` on Ray Serve: 2 engine replicas of the tiny model, 4 adapters, affinity routing.

A local Ray cluster (``ray.init`` on this machine, no dashboard, no usage stats, nothing
downloaded) runs :mod:`moa.serve.ray_app` with 2 engine replicas. Requests go over HTTP to
Ray's proxy on 127.0.0.1, across named adapters, mixtures, ``auto`` and the base, streamed
and not. Checked: both replicas serve; after warm-up >= 90 % of each key's requests land on
a replica that already holds that key; adapter loads stay within the keys plus a small slack;
with ``max_ongoing_requests`` low, a burst on one key spills to the other replica; and every
greedy answer equals the same request on a single ``moa serve`` (built by the CLI's own
``build_server``). Then ``serve.shutdown()`` and ``ray.shutdown()``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'moa[ray]'): the Ray Serve backend "
                                        "cannot be tested")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'moa[ray]')")

from tests.serve.conftest import free_port, make_adapter_folders  # noqa: E402

# A module-level guard: a Ray cluster that hangs must not hold CI (each step below is bounded too).
pytestmark = pytest.mark.timeout(900)

ADAPTERS = {"sql": 4, "code": 8, "french": 16, "icd": 2}
GATED = ["sql", "code"]
SERVED = "tiny-base"
MAX_LORAS = 4
MAX_ONGOING = 3
#: (model, adapter_weights) per residency key; the base has no key.
KEYED_REQUESTS: dict[str, tuple[str, dict[str, float] | None]] = {
    "french": ("french", None),
    "icd": (f"{SERVED}:icd", None),
    "sql": ("sql", None),
    "code+french": (SERVED, {"french": 0.6, "code": 0.4}),
    "icd+sql": (SERVED, {"sql": 0.5, "icd": 0.5}),
    "auto": ("auto", None),
}
PROMPTS = [f"request {i}: " + "abcdefghij"[: 2 + i % 7] for i in range(10)]
STEADY_REQUESTS = 84  # 12 per key: one stray request leaves 11/12 > 90 %
SHORT_TOKENS = 6
BURST_KEY = "french"
BURST_SIZE = 9
BURST_TOKENS = 230
STARTUP_TIMEOUT = 300.0
REQUEST_TIMEOUT = 120.0


def _gate_folder(root: Path, hidden_size: int) -> Path:
    from moa.routing.learned_gate import LearnedGate

    torch.manual_seed(3)
    gate = LearnedGate(list(GATED), hidden_size=hidden_size, hidden_layer=1, mlp_hidden=16, top_k=2)
    with torch.no_grad():  # a random head with confident, prompt-dependent decisions
        for param in gate.head.parameters():
            param.normal_(0, 1.0)
    return gate.eval().save(root / "gate")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny base as a folder, 4 PEFT adapter folders and a gate folder over two of them."""
    from moa.testing.fixtures import TINY_CONFIG, save_tiny_base

    root = tmp_path_factory.mktemp("ray-assets")
    base = save_tiny_base(root / "base")
    folders = make_adapter_folders(root, ADAPTERS)
    gate = _gate_folder(root, TINY_CONFIG["hidden_size"])
    modules = [f"{name}={folder}" for name, folder in folders.items()]
    return {"base": str(base), "modules": modules, "router": str(gate)}


def _serve_args(assets: dict[str, Any], *extra: str) -> argparse.Namespace:
    """``moa serve`` arguments, parsed by the CLI's own parser."""
    from moa.commands.serve import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", "--base", assets["base"], "--quantization", "none", "--served-model-name",
                              SERVED, "--lora-modules", *assets["modules"], "--router", assets["router"],
                              "--max-loras", str(MAX_LORAS), "--max-batch-size", "4", "--max-prompt-tokens", "64",
                              *extra])


def _post(base_url: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    """POST JSON; returns (status, headers lower-cased, generated text or the error body)."""
    request = urllib.request.Request(f"{base_url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            status, headers, raw = response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read().decode()
    headers = {k.lower(): v for k, v in headers.items()}
    if body.get("stream"):
        text = ""
        for line in raw.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        return status, headers, text
    choice = json.loads(raw)["choices"][0]
    return status, headers, choice.get("text") if "text" in choice else choice["message"]["content"]


def _body(key: str | None, prompt: str, max_tokens: int, stream: bool = False, chat: bool = False) -> dict:
    model, weights = KEYED_REQUESTS[key] if key else (SERVED, None)
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0,
                            "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if weights is not None:
        body["adapter_weights"] = weights
    return body


def _path(body: dict[str, Any]) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


def _request_id(body: dict[str, Any]) -> str:
    """What makes two requests the same request (for the single-server reference)."""
    return json.dumps({k: v for k, v in body.items() if k != "stream"}, sort_keys=True)


@pytest.fixture(scope="module")
def ray_stack(assets: dict[str, Any]) -> Any:
    """A local Ray cluster serving the tiny model on 2 engine replicas; yields its base URL."""
    with pytest.MonkeyPatch.context() as env:  # Ray's processes inherit these from this one
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # A replica at max_ongoing_requests passes its key's requests on after this many
        # seconds (Ray's default: 1): keeps the burst below short.
        env.setenv("RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S", "0.5")
        # Routers probe a replica's queue before sending; on 2 busy cores the default 0.1 s
        # answer deadline can pass, and the request would go elsewhere although its replica
        # had room.
        env.setenv("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
        env.setenv("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "2.0")
        yield from _ray_stack(assets)


def _ray_stack(assets: dict[str, Any]) -> Any:
    from moa.serve.ray_app import APP_NAME, build_app
    from moa.serve.ray_options import RayServeOptions

    args = _serve_args(assets, "--backend", "ray", "--replicas", "2")
    options = RayServeOptions.from_namespace(args).model_copy(
        update={"max_ongoing_requests": MAX_ONGOING, "replica_cpus": 0.5, "threads": 1,
                # room for every key on one replica: Ray never evicts a key here, so a stray
                # request (a slow queue-length probe) cannot move a key for good
                "keys_per_replica": len(KEYED_REQUESTS)})
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.monotonic()
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
        base_url = f"http://127.0.0.1:{port}"
        _wait_ready(base_url, started)
        yield base_url
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_ready(base_url: str, started: float) -> None:
    last: object = None
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=10) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            last = f"{error.code}: {error.read()[:300]!r}"
            if error.code < 500:
                raise AssertionError(f"/health answered {last}") from None
        except (urllib.error.URLError, OSError) as error:
            last = error
        if time.monotonic() - started > STARTUP_TIMEOUT:
            raise AssertionError(f"The Ray Serve application did not answer /health within {STARTUP_TIMEOUT} s "
                                 f"(last: {last}).")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def single_server(assets: dict[str, Any]) -> Any:
    """One plain ``moa serve`` (the CLI's build_server) over the same base, adapters and gate."""
    from moa.commands.serve import build_server

    server, engine, _ = build_server(_serve_args(assets, "--port", str(free_port()), "--log-level", "warning"))
    thread = threading.Thread(target=server.run, name="single-moa-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the single moa serve did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown(timeout=10, cancel=True)


def test_two_replicas_route_by_adapter_affinity(ray_stack: str, single_server: str) -> None:
    served: list[tuple[dict[str, Any], dict[str, str], str]] = []

    def send(body: dict[str, Any]) -> tuple[dict[str, str], str]:
        status, headers, text = _post(ray_stack, _path(body), body)
        assert status == 200, f"{body} -> {status}: {text}"
        served.append((body, headers, text))
        return headers, text

    # Warm-up: each key once, one at a time (Ray places each new key on the replica holding fewest).
    for key in [*KEYED_REQUESTS, None]:
        send(_body(key, PROMPTS[0], SHORT_TOKENS))
    time.sleep(1.0)  # the replicas report their keys to Ray's routers every 0.1 s
    warm = len(served)

    # Steady traffic: every key, streamed and not, chat and completions, 2 clients at a time.
    keys = [*KEYED_REQUESTS, None]
    bodies = [_body(keys[i % len(keys)], PROMPTS[i % len(PROMPTS)], SHORT_TOKENS, stream=i % 3 == 0,
                    chat=i % 5 == 0) for i in range(STEADY_REQUESTS)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(send, bodies))
    steady = served[warm:]
    assert len(served) >= 40

    replicas = {headers["x-moa-replica"] for _, headers, _ in served}
    assert len(replicas) == 2, f"expected both replicas to serve, got {replicas}"
    by_key: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
    for _, headers, _ in steady:
        if headers["x-moa-residency-key"]:
            by_key[headers["x-moa-residency-key"]].append(headers)
    assert len(by_key) == len(KEYED_REQUESTS)
    for key, answers in by_key.items():
        hits = sum(h["x-moa-key-resident"] == "1" for h in answers)
        placed = collections.Counter(h["x-moa-replica"] for h in answers).most_common(1)[0][1]
        assert hits / len(answers) >= 0.9, f"key {key}: {hits}/{len(answers)} served where it was resident"
        assert placed / len(answers) >= 0.9, f"key {key}: spread over replicas {answers}"

    # Adapter loads: the non-pinned adapters once per replica that holds them, at most.
    loads = {}
    for _, headers, _ in served:
        replica = headers["x-moa-replica"]
        loads[replica] = max(loads.get(replica, 0), int(headers["x-moa-adapter-loads"]))
    assert sum(loads.values()) <= len(KEYED_REQUESTS) + 2, loads

    # A burst on one key, beyond max_ongoing_requests: it spills to the other replica.
    burst = [_body(BURST_KEY, PROMPTS[i], BURST_TOKENS) for i in range(BURST_SIZE)]
    before = len(served)
    with concurrent.futures.ThreadPoolExecutor(BURST_SIZE) as pool:
        list(pool.map(send, burst))
    burst_replicas = collections.Counter(headers["x-moa-replica"] for _, headers, _ in served[before:])
    assert len(burst_replicas) == 2, f"a burst of {BURST_SIZE} on {BURST_KEY!r} stayed on {burst_replicas}"

    # Every greedy answer equals the same request on a single moa serve (batched there too).
    unique = {_request_id(body): body for body, _, _ in served}

    def on_single_server(body: dict[str, Any]) -> str:
        status, _, text = _post(single_server, _path(body), {**body, "stream": False})
        assert status == 200, text
        return text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        reference = dict(zip(unique, pool.map(on_single_server, unique.values()), strict=True))
    for body, _, text in served:
        expected = reference[_request_id(body)]
        assert text == expected, f"{body}: Ray {text!r} != single server {expected!r}"


def test_a_client_that_leaves_mid_stream_cancels_its_row(ray_stack: str) -> None:
    import http.client

    host, port = ray_stack.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT)
    connection.request("POST", "/v1/completions", json.dumps(_body("icd", PROMPTS[0], BURST_TOKENS, stream=True)),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    replica = response.getheader("x-moa-replica")
    assert response.status == 200 and response.fp.readline()  # the first event's chunk
    connection.close()  # the client goes away mid-stream

    # /metrics reaches either replica (and says which); the one that streamed must have
    # counted the request as cancelled, with nothing left running.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{ray_stack}/metrics", timeout=10) as scrape:
            text = scrape.read().decode()
            if scrape.headers["x-moa-replica"] == replica and 'finish_reason="cancelled"' in text \
                    and "vllm:num_requests_running 0.0" in text:
                return
        time.sleep(0.2)
    raise AssertionError(f"replica {replica} did not cancel the abandoned stream")


def test_runtime_loading_is_refused_with_a_reason(ray_stack: str) -> None:
    status, _, text = _post(ray_stack, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere"})
    assert status == 404
    assert "redeploy" in json.loads(text)["error"]["message"]


def test_errors_keep_the_openai_shape(ray_stack: str) -> None:
    status, _, text = _post(ray_stack, "/v1/completions", {"model": "nope", "prompt": "hi", "max_tokens": 2})
    assert status == 404
    assert json.loads(text)["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("name", ["serve.yaml", "rayservice.yaml"])
def test_example_configs_build_the_application(name: str) -> None:
    """examples/ray's Serve configs pass Ray's schema, and their args build the application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from moa.serve.ray_app import build
    from moa.serve.ray_options import RayServeOptions

    document = yaml.safe_load((Path(__file__).parents[2] / "examples" / "ray" / name).read_text())
    config = yaml.safe_load(document["spec"]["serveConfigV2"]) if document.get("kind") == "RayService" else document
    [application] = ServeDeploySchema.model_validate(config).applications
    assert application.import_path == "moa.serve.ray_app:build"
    options = RayServeOptions.model_validate(application.args)
    assert isinstance(build(application.args), serve.Application)
    engine = options.engine_deployment_options()
    assert engine["autoscaling_config"]["target_ongoing_requests"] == options.max_batch_size
    assert engine["max_ongoing_requests"] == 2 * options.max_batch_size


def test_options_from_the_command_line_and_from_strings(tmp_path: Path) -> None:
    from moa.commands.serve import register
    from moa.serve.ray_options import RayServeOptions

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--backend", "ray", "--replicas", "3", "--max-loras", "5", "--lora-modules",
                              "sql=./a", "code=alice/code@v1", "--no-router", "--max-batch-size", "8"])
    options = RayServeOptions.from_namespace(args)
    assert (options.replicas, options.max_loras, options.no_router) == (3, 5, True)
    assert options.lora_modules == {"sql": "./a", "code": "alice/code@v1"}
    deployment = options.engine_deployment_options()
    assert deployment["num_replicas"] == 3 and deployment["max_ongoing_requests"] == 16
    assert options.keys_for(5) == 5 and options.keys_for(None) == 16
    # `serve run moa.serve.ray_app:build key=value`: every value a string
    parsed = RayServeOptions.model_validate({"replicas": "2", "no_router": "true", "lora_modules": "sql=./a,code=./b"})
    assert parsed.replicas == 2 and parsed.no_router and parsed.lora_modules == {"sql": "./a", "code": "./b"}
    with pytest.raises(ValueError):
        RayServeOptions.model_validate({"replica": 2})  # a misspelt field is refused, not ignored
