"""Soak ``moa serve``: thousands of requests, a tenth of them hostile, then check that nothing broke.

``--requests`` requests (default 2,000) from 16 to 32 concurrent clients (the count switches
between ``--clients LOW HIGH`` every ``--phase-seconds``), for at least ``--min-seconds``
(default 600: the soak goes on past the request count until then), against a ``moa serve``
process on 127.0.0.1 (``--base default``: the shipped base and five adapters with the shipped
gate; ``--base tiny``: a tiny random base and random adapters, for a quick run). Runtime
loading is on and ``--max-loras`` is small, so adapters are evicted and reloaded throughout.

About ``--hostile-share`` (10 %) of the requests are hostile, one kind after the other:

* ``disconnect``: a streamed request whose client closes the connection after two chunks;
* ``abandon``: a non-streamed request whose client gives up (times out) before the answer;
* ``extreme_sampling``: temperature 1e-4, top_p 1e-9, seed 2**63-1, ``n`` 1 or 2, a long answer;
* ``huge_max_tokens`` (2**31), ``bad_seed`` (2**63): refused with 400;
* ``unknown_adapter``: a ``model`` or an ``adapter_weights`` entry the server does not know;
* ``malformed_json``: cut JSON, not JSON, an empty body, bytes that are not UTF-8;
* ``wrong_types``: ``messages`` as a string, ``max_tokens`` as words, ``model`` as a number...;
* ``admin_load``, ``admin_unload``, ``admin_bad_load``: ``/v1/load_lora_adapter`` (new names,
  which evict; replacements of names in use; missing folders) and ``/v1/unload_lora_adapter``
  of adapters maybe in use; ``churn_use``: requests naming those churned adapters meanwhile.

The other requests are good and greedy: chat or completions, streamed or not, naming an
adapter, the base, ``base:adapter``, ``auto`` (with a router) or an exact mixture.

Checks (``checks`` in the JSON; the command exits 1 when one fails):

* ``no_engine_death``: ``/health`` answered 200 at every poll (each second) and at the end;
* ``statuses``: every answer's status is one its kind allows (so no 5xx anywhere), every
  good request got 200 (a 409 or 429 is retried: an eviction or a full queue);
* ``greedy_equal_alone``: every good answer equals the same request sent alone afterwards;
* ``drained``: no request running or waiting once the soak is over (cut streams freed their rows);
* ``memory``: the server's PSS (``moa_process_pss_bytes`` in ``/metrics``) after the soak at
  most ``--memory-tolerance`` (5 %) above its PSS after the warm-up.

The soak (:func:`run_soak`) speaks only HTTP; ``tests/serve/test_soak.py`` runs a bounded one
against an in-process server. Writes JSON to ``benchmarks/results/serve_soak.json``.

Run: ``.venv/bin/python benchmarks/serve_soak.py [--base default|tiny] [--quantization none|nf4]``
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import platform
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

logger = logging.getLogger("serve_soak")

RESULTS = Path(__file__).resolve().parent / "results" / "serve_soak.json"
#: Statuses an engine request may get whatever its kind: a full queue (the soak retries good ones).
BUSY = frozenset({429})
#: Names the admin churn loads, unloads and replaces (from the stable adapters' sources).
CHURN_NAMES = ("churn-0", "churn-1", "churn-2")
#: Hostile kinds, in the order they take turns.
HOSTILE_KINDS = ("disconnect", "admin_load", "extreme_sampling", "churn_use", "unknown_adapter", "admin_load",
                 "malformed_json", "admin_unload", "wrong_types", "churn_use", "abandon", "admin_load",
                 "huge_max_tokens", "admin_bad_load", "bad_seed", "churn_use")
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass(frozen=True)
class SoakTarget:
    """The server under soak, as seen over HTTP.

    Attributes:
        base_url: ``http://127.0.0.1:PORT``.
        base_name: The base's name in the API (``--served-model-name``).
        adapters: Adapters good requests name (they stay registered throughout).
        sources: Folders the admin churn loads adapters from.
        router: Whether ``model="auto"`` is served.
        prompts: Prompts of the good requests.
        max_tokens: ``max_tokens`` of the good requests.
        long_max_tokens: A ``max_tokens`` that still fits the context with any of ``prompts``.
    """

    base_url: str
    base_name: str
    adapters: tuple[str, ...]
    sources: tuple[str, ...]
    router: bool
    prompts: tuple[str, ...]
    max_tokens: int = 8
    long_max_tokens: int = 128


@dataclass(frozen=True)
class Call:
    """One HTTP call of the soak.

    Attributes:
        index: Its place in the plan.
        kind: ``"good"`` or a hostile kind.
        path: The URL path.
        body: The JSON body (``None``: ``raw`` or a GET).
        raw: A raw body sent as it is (malformed JSON).
        expect: Statuses this kind allows.
        stream: Read the answer as Server-Sent Events.
        cut_after: Close the connection after this many streamed chunks (0: read it all).
        timeout: Client timeout in seconds (``abandon`` gives up early on purpose).
    """

    index: int
    kind: str
    path: str
    body: Any = None
    raw: bytes | None = None
    expect: frozenset[int] = frozenset({200})
    stream: bool = False
    cut_after: int = 0
    timeout: float = 600.0

    def key(self) -> str:
        """The request's identity for the replay alone (the stream fields left out)."""
        body = {k: v for k, v in self.body.items() if k not in ("stream", "stream_options")}
        return json.dumps([self.path, body], sort_keys=True)


@dataclass
class Outcome:
    """What one call got: ``status`` is the HTTP status, or ``cut`` (the client closed the stream on
    purpose), ``abandoned`` (the client timed out), ``stream-error`` (an error event inside a 200
    stream), ``truncated`` (a stream without ``[DONE]``) or ``error`` (no HTTP answer at all)."""

    call: Call
    status: int | str
    text: str | None = None
    seconds: float = 0.0
    retries: int = 0
    detail: str = ""


# -- the plan ------------------------------------------------------------------------------


def plan_call(target: SoakTarget, index: int, hostile_share: float, seed: int = 0) -> Call:
    """Call ``index`` of the soak: good, or (every ``1/hostile_share``-th) the next hostile kind."""
    rng = random.Random(seed * 1_000_003 + index)
    every = max(1, round(1 / hostile_share)) if hostile_share > 0 else 0
    if every and index % every == every - 1:
        return _hostile(target, index, HOSTILE_KINDS[(index // every) % len(HOSTILE_KINDS)], rng)
    return _good(target, index, rng)


def _good(target: SoakTarget, index: int, rng: random.Random) -> Call:
    adapters = list(target.adapters)
    choice = rng.randrange(6 if target.router else 5)
    extra: dict[str, Any] = {}
    if choice <= 1:
        model = rng.choice(adapters)
    elif choice == 2:
        model = target.base_name
    elif choice == 3:
        model = f"{target.base_name}:{rng.choice(adapters)}"
    elif choice == 4:
        first = rng.randrange(len(adapters))  # neighbours only: fewer distinct requests to replay alone
        mix = {adapters[first]: 0.7, adapters[(first + 1) % len(adapters)]: 0.3}
        model, extra = target.base_name, {"adapter_weights": mix}
    else:
        model = "auto"
    prompt = rng.choice(target.prompts)
    body: dict[str, Any] = {"model": model, "max_tokens": target.max_tokens, "temperature": 0, **extra}
    chat = rng.random() < 0.6
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    stream = rng.random() < 0.5
    if stream:
        body.update({"stream": True, "stream_options": {"include_usage": True}})
    return Call(index, "good", CHAT if chat else COMPLETIONS, body, stream=stream)


def _hostile(target: SoakTarget, index: int, kind: str, rng: random.Random) -> Call:
    prompt = rng.choice(target.prompts)
    adapter = rng.choice(target.adapters)
    chat = {"model": adapter, "messages": [{"role": "user", "content": prompt}]}
    if kind == "disconnect":
        return Call(index, kind, CHAT, {**chat, "max_tokens": target.long_max_tokens, "temperature": 0.7,
                                        "stream": True}, expect=frozenset({200}) | BUSY, stream=True, cut_after=2)
    if kind == "abandon":
        return Call(index, kind, CHAT, {**chat, "max_tokens": target.long_max_tokens},
                    expect=frozenset({200}) | BUSY, timeout=0.05)
    if kind == "extreme_sampling":
        body = {**chat, "max_tokens": target.long_max_tokens, "temperature": 1e-4, "top_p": 1e-9,
                "seed": 2**63 - 1, "n": rng.choice((1, 2))}
        return Call(index, kind, CHAT, body, expect=frozenset({200}) | BUSY)
    if kind == "huge_max_tokens":
        return Call(index, kind, CHAT, {**chat, "max_tokens": 2**31}, expect=frozenset({400}))
    if kind == "bad_seed":
        return Call(index, kind, CHAT, {**chat, "max_tokens": 2, "seed": 2**63}, expect=frozenset({400}))
    if kind == "unknown_adapter":
        if rng.random() < 0.5:
            return Call(index, kind, CHAT, {**chat, "model": f"ghost-{index}"}, expect=frozenset({404}))
        body = {**chat, "model": target.base_name, "adapter_weights": {adapter: 0.5, f"ghost-{index}": 0.5}}
        return Call(index, kind, CHAT, body, expect=frozenset({400, 404}))
    if kind == "malformed_json":
        raw = rng.choice((json.dumps(chat).encode()[:-7], b"not json", b"", b"\xff\xfe{\x00", b'{"model": '))
        return Call(index, kind, rng.choice((CHAT, COMPLETIONS)), raw=raw, expect=frozenset({400}))
    if kind == "wrong_types":
        body = rng.choice(({"model": adapter, "messages": prompt}, {**chat, "max_tokens": "ten"},
                           {**chat, "model": 12}, {**chat, "temperature": "hot"}, [chat], {**chat, "n": 0},
                           {**chat, "stop": 5}, {**chat, "top_p": -1}, {**chat, "unknown_field": 1}))
        return Call(index, kind, CHAT, body, expect=frozenset({400}))
    if kind.startswith(("admin", "churn")):
        return _admin(target, index, kind, rng)
    raise ValueError(f"Unknown hostile kind {kind!r}.")


def _admin(target: SoakTarget, index: int, kind: str, rng: random.Random) -> Call:
    """Load (a new name, or a replacement of one maybe in use), unload, load from nowhere, or use a
    churned adapter (streamed or not, so it is in use for a while)."""
    name = CHURN_NAMES[index % len(CHURN_NAMES)]  # in turn: consecutive loads fill the cache and evict
    if kind == "admin_load":  # 409: replacing a name in use, or every resident adapter in use
        body = {"lora_name": name, "lora_path": rng.choice(target.sources)}
        return Call(index, kind, "/v1/load_lora_adapter", body, expect=frozenset({200, 409}))
    if kind == "admin_unload":
        return Call(index, kind, "/v1/unload_lora_adapter", {"lora_name": name}, expect=frozenset({200, 404, 409}))
    if kind == "admin_bad_load":
        body = {"lora_name": name, "lora_path": f"/nonexistent/soak-{index}"}
        return Call(index, kind, "/v1/load_lora_adapter", body, expect=frozenset({400}))
    stream = rng.random() < 0.5
    body = {"model": rng.choice(CHURN_NAMES), "messages": [{"role": "user", "content": rng.choice(target.prompts)}],
            "max_tokens": target.max_tokens * 2, "temperature": 0, "stream": stream}
    return Call(index, kind, CHAT, body, expect=frozenset({200, 404, 409}) | BUSY, stream=stream)


# -- sending -------------------------------------------------------------------------------


def send(base_url: str, call: Call) -> Outcome:
    """Send one call on a connection of its own and read (or cut) its answer; never raises for what
    the server does. Closing the connection early is how a client disconnects."""
    start = time.perf_counter()
    where = urlsplit(base_url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=call.timeout)
    content = call.raw if call.raw is not None else json.dumps(call.body).encode()
    try:
        connection.request("POST", call.path, body=content, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return Outcome(call, response.status, None, time.perf_counter() - start,
                           detail=response.read().decode(errors="replace")[:300])
        if call.stream:
            status, text, detail = _read_stream(response, call)
        else:
            status, detail = 200, ""
            body = json.loads(response.read())
            text = _answer_text(body, call.path) if call.path in (CHAT, COMPLETIONS) else None
    except TimeoutError:
        return Outcome(call, "abandoned", None, time.perf_counter() - start)
    except (OSError, http.client.HTTPException, ValueError) as error:
        return Outcome(call, "error", None, time.perf_counter() - start, detail=f"{type(error).__name__}: {error}")
    finally:
        connection.close()
    return Outcome(call, status, text, time.perf_counter() - start, detail=detail)


def _answer_text(body: dict[str, Any], path: str) -> str:
    choices = sorted(body["choices"], key=lambda c: c["index"])
    texts = [c["message"]["content"] if path == CHAT else c["text"] for c in choices]
    return texts[0] if len(texts) == 1 else json.dumps(texts)


def _read_stream(response: http.client.HTTPResponse, call: Call) -> tuple[int | str, str, str]:
    """``(status, text, detail)`` of an SSE answer: ``cut`` after ``cut_after`` chunks, ``stream-error``
    for an error event, ``truncated`` without ``[DONE]``."""
    parts: list[str] = []
    chunks = 0
    while line := response.readline():
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):].strip()
        if data == b"[DONE]":
            return 200, "".join(parts), ""
        chunk = json.loads(data)
        if "error" in chunk:
            return "stream-error", "".join(parts), json.dumps(chunk)[:300]
        for choice in chunk.get("choices") or ():
            parts.append((choice.get("delta") or {}).get("content") or "" if call.path == CHAT
                         else choice.get("text") or "")
        chunks += 1
        if call.cut_after and chunks >= call.cut_after:
            return "cut", "".join(parts), ""  # the caller closes the connection mid-stream
    return "truncated", "".join(parts), "the stream ended without [DONE]"


def send_good(base_url: str, call: Call, retries: int = 30) -> Outcome:
    """Send a good call, retrying 409 (every resident adapter in use) and 429 (queue full)."""
    for attempt in range(retries + 1):
        outcome = send(base_url, call)
        if outcome.status not in (409, 429):
            outcome.retries = attempt
            return outcome
        time.sleep(min(2.0, 0.05 * (attempt + 1)))
    outcome.retries = retries
    return outcome


# -- watching the server -------------------------------------------------------------------


def server_gauges(base_url: str) -> dict[str, float]:
    """PSS, running and waiting requests and adapter evictions so far, from ``/metrics``."""
    wanted = ("moa_process_pss_bytes", "moa_num_requests_running", "moa_num_requests_waiting",
              "moa_adapter_evictions")
    with urlopen(base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    gauges = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            gauges[name] = float(value)
    return gauges


def drained_gauges(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """:func:`server_gauges` once no request runs or waits (cut streams' rows leave at the engine's
    next step), or as they are after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = server_gauges(base_url)
        busy = gauges.get("moa_num_requests_running", 0) + gauges.get("moa_num_requests_waiting", 0)
        if not busy or time.monotonic() > deadline:
            return gauges
        time.sleep(0.5)


def fill_adapter_cache(target: SoakTarget) -> None:
    """Load every churn name: the server then holds as many adapters as the soak ever makes it hold,
    so its memory after the warm-up and after the soak compare like with like."""
    for i, name in enumerate(CHURN_NAMES):
        body = {"lora_name": name, "lora_path": target.sources[i % len(target.sources)]}
        send(target.base_url, Call(-1, "admin_load", "/v1/load_lora_adapter", body))


def settled_pss(base_url: str, samples: int = 3, pause: float = 0.5) -> float:
    """The server's PSS in bytes once idle: the median of a few samples."""
    values = []
    for _ in range(samples):
        time.sleep(pause)
        values.append(server_gauges(base_url)["moa_process_pss_bytes"])
    return statistics.median(values)


class HealthWatch:
    """Polls ``/health`` every ``interval`` seconds on a thread; keeps every answer that is not 200."""

    def __init__(self, base_url: str, interval: float = 1.0) -> None:
        self.base_url, self.interval, self.polls, self._start = base_url, interval, 0, time.monotonic()
        self.failures: list[dict[str, Any]] = []
        self._stop, self._thread = threading.Event(), threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.poll()  # and once more at the very end

    def poll(self) -> None:
        """One poll."""
        try:
            with urlopen(self.base_url + "/health", timeout=30) as response:
                status: int | str = response.status
        except OSError as error:  # HTTPError (a 503...) is an OSError too
            status = getattr(error, "code", None) or f"{type(error).__name__}: {error}"
        self.polls += 1
        if status != 200:
            self.failures.append({"at_s": round(time.monotonic() - self._start, 1), "status": status})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()


# -- the soak ------------------------------------------------------------------------------


def drive(target: SoakTarget, first: int, count: int, clients: tuple[int, int], *, min_seconds: float = 0.0,
          phase_seconds: float = 30.0, hostile_share: float = 0.1, seed: int = 0) -> tuple[list[Outcome], float]:
    """Send calls ``first, first + 1, ...`` from ``clients[1]`` threads, ``clients[0]`` of them active in
    every other phase, until ``count`` were sent and ``min_seconds`` have passed."""
    low, high = clients
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    cursor = [first]
    start = time.monotonic()

    def next_index(worker: int) -> int | None:
        while True:
            elapsed = time.monotonic() - start
            with lock:
                if cursor[0] - first >= count and elapsed >= min_seconds:
                    return None
                active = high if int(elapsed // phase_seconds) % 2 else low
                if worker < active:
                    cursor[0] += 1
                    return cursor[0] - 1
            time.sleep(0.05)

    def worker(number: int) -> None:
        while (index := next_index(number)) is not None:
            call = plan_call(target, index, hostile_share, seed)
            outcome = send_good(target.base_url, call) if call.kind == "good" else send(target.base_url, call)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(i,), name=f"soak-client-{i}") for i in range(high)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes, key=lambda o: o.call.index), time.monotonic() - start


def replay_alone(target: SoakTarget, outcomes: list[Outcome]) -> tuple[int, list[dict[str, Any]]]:
    """Send each distinct good request once more, alone and not streamed; every soak answer
    of it must equal that one. Returns ``(distinct requests, mismatches)``."""
    by_key: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        if outcome.call.kind == "good" and outcome.status == 200:
            by_key.setdefault(outcome.call.key(), []).append(outcome)
    mismatches = []
    for group in by_key.values():
        call = group[0].call
        body = {k: v for k, v in call.body.items() if k not in ("stream", "stream_options")}
        alone = send_good(target.base_url, Call(-1, "good", call.path, body))
        for outcome in group:
            if alone.status != 200 or outcome.text != alone.text:
                mismatches.append({"index": outcome.call.index, "path": call.path, "request": body,
                                   "streamed": outcome.call.stream, "expected_alone": alone.text,
                                   "alone_status": alone.status, "got": outcome.text})
    return len(by_key), mismatches


def run_soak(target: SoakTarget, *, requests: int = 2000, clients: tuple[int, int] = (16, 32),
             min_seconds: float = 0.0, phase_seconds: float = 30.0, hostile_share: float = 0.1,
             warmup: int = 64, memory_tolerance: float | None = 0.05, seed: int = 0,
             log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Warm up, soak, replay the good requests alone and check; the report as a JSON-able dict.

    Args:
        target: The server.
        requests: Calls in the soak (at least; it goes on until ``min_seconds``).
        clients: ``(low, high)`` concurrent clients, switching every ``phase_seconds``.
        min_seconds: Shortest soak.
        phase_seconds: Seconds between client-count switches.
        hostile_share: Share of hostile calls.
        warmup: Calls before the soak (the same mix at ``high`` clients), after which memory is taken.
        memory_tolerance: Largest relative PSS growth from warm-up to the end (``None``: not checked).
            PSS counts shared pages in part, so other processes that map the same libraries move it.
        seed: Seed of the plan.
        log: Where progress lines go.
    """
    warm, _ = drive(target, 0, warmup, (clients[1], clients[1]), hostile_share=hostile_share, seed=seed + 1)
    fill_adapter_cache(target)
    pss_warm = settled_pss(target.base_url)
    log(f"warm-up: {len(warm)} calls, PSS {pss_warm / 2**20:.1f} MiB")
    with HealthWatch(target.base_url) as health:
        outcomes, seconds = drive(target, 0, requests, clients, min_seconds=min_seconds,
                                  phase_seconds=phase_seconds, hostile_share=hostile_share, seed=seed)
    log(f"soak: {len(outcomes)} calls in {seconds:.0f} s, /health polled {health.polls} times, "
        f"{len(health.failures)} failures")
    gauges = drained_gauges(target.base_url)
    fill_adapter_cache(target)
    pss_end = settled_pss(target.base_url)
    distinct, mismatches = replay_alone(target, outcomes)
    log(f"replay: {distinct} distinct good requests alone, {len(mismatches)} answers differ")
    return report(outcomes, seconds, health, gauges, pss_warm, pss_end, distinct, mismatches, memory_tolerance)


def report(outcomes: list[Outcome], seconds: float, health: HealthWatch, gauges: dict[str, float], pss_warm: float,
           pss_end: float, distinct: int, mismatches: list[dict[str, Any]], memory_tolerance: float | None) -> dict:
    """The soak's JSON report and its checks."""
    kinds: dict[str, Counter[str]] = {}
    unexpected = []
    for outcome in outcomes:
        kinds.setdefault(outcome.call.kind, Counter())[str(outcome.status)] += 1
        allowed = {*outcome.call.expect, *(("cut",) if outcome.call.cut_after else ()),
                   *(("abandoned",) if outcome.call.timeout < 1 else ())}
        if outcome.status not in allowed:
            unexpected.append({"index": outcome.call.index, "kind": outcome.call.kind, "path": outcome.call.path,
                               "request": outcome.call.body if outcome.call.raw is None
                               else outcome.call.raw.decode(errors="replace"),
                               "status": outcome.status, "detail": outcome.detail})
    good = [o for o in outcomes if o.call.kind == "good"]
    growth = pss_end / pss_warm - 1
    checks = {"no_engine_death": not health.failures, "statuses": not unexpected, "greedy_equal_alone": not mismatches,
              "drained": not gauges.get("moa_num_requests_running", 0) + gauges.get("moa_num_requests_waiting", 0)}
    if memory_tolerance is not None:
        checks["memory"] = growth <= memory_tolerance  # shrinking is fine (PSS also moves as peers map libraries)
    latencies = sorted(o.seconds for o in good if o.status == 200)
    return {
        "calls": len(outcomes), "seconds": round(seconds, 1), "good": len(good),
        "good_retries": sum(o.retries for o in good),
        "statuses_by_kind": {k: dict(v) for k, v in sorted(kinds.items())},
        "good_latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "good_latency_p99_s": round(latencies[round(0.99 * (len(latencies) - 1))], 3) if latencies else None,
        "health_polls": health.polls, "health_failures": health.failures, "unexpected": unexpected[:50],
        "unexpected_count": len(unexpected), "distinct_good_requests": distinct, "mismatches": mismatches[:50],
        "mismatch_count": len(mismatches), "gauges_after": gauges, "pss_after_warmup_mib": round(pss_warm / 2**20, 1),
        "pss_after_soak_mib": round(pss_end / 2**20, 1), "pss_growth": round(growth, 4),
        "memory_tolerance": memory_tolerance, "checks": checks, "passed": all(checks.values()),
    }


# -- the benchmark's server ----------------------------------------------------------------


def tiny_server_files(root: Path) -> tuple[Path, dict[str, str]]:
    """A tiny random base folder and four random LoRA adapters (ranks 2-16) under ``root``."""
    import torch

    import moa
    from moa.testing.fixtures import make_tiny_model, save_tiny_base

    base = save_tiny_base(root / "tiny-base")
    torch.manual_seed(0)
    maker = make_tiny_model(base)
    folders = {}
    for name, rank in {"sql": 4, "code": 8, "french": 16, "icd": 2}.items():
        maker.add_adapter(name, moa.LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                               target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        with torch.no_grad():  # B scaled up: each adapter visibly changes the tiny model's answers
            for layer in maker.adapter_layers(name).values():
                for pname, param in layer.named_parameters():
                    if pname.startswith("lora_B"):
                        param.mul_(4.0)
        maker.save_adapter(name, root / name)
        folders[name] = str(root / name)
    return base, folders


def main() -> None:
    import tempfile

    from serve_vs_vllm import MoaServer  # benchmarks/ is on sys.path when this runs as a script

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", choices=("default", "tiny"), default="default")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none", help="of the default base")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, nargs=2, default=[16, 32], metavar=("LOW", "HIGH"))
    parser.add_argument("--min-seconds", type=float, default=600.0)
    parser.add_argument("--phase-seconds", type=float, default=30.0)
    parser.add_argument("--hostile-share", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=16, help="of the good requests")
    parser.add_argument("--warmup", type=int, default=96)
    parser.add_argument("--memory-tolerance", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="moa-soak-") as tmp:
        if args.base == "tiny":
            base, folders = tiny_server_files(Path(tmp))
            serve_args = ["--base", str(base), "--quantization", "none", "--no-router", "--lora-modules",
                          *(f"{n}={p}" for n, p in folders.items()), "--max-loras", "5"]
            prompts = tuple(f"soak prompt {i}: " + "abcdefghij"[: 3 + i % 7] * (1 + i % 4) for i in range(24))
            base_name, router, long_max = "tiny-base", False, 128
        else:
            from moa.data import DOMAINS, load_split
            from moa.eval.assets import adapter_folders, shipped_adapters_dir

            folders = {n: str(p) for n, p in adapter_folders(shipped_adapters_dir()).items()}
            serve_args = ["--quantization", args.quantization, "--max-loras", str(len(folders) + 2)]
            prompts = tuple(s.prompt for d in DOMAINS for s in load_split(d, "test")[:12])
            base_name, router, long_max = "base", True, 512
        serve_args += ["--served-model-name", base_name, "--allow-runtime-loading", "--max-batch-size", "32",
                       "--max-queue", "256", "--log-level", "warning"]
        with MoaServer(serve_args, log_path=Path(tmp) / "server.log") as server:
            target = SoakTarget(server.base_url, base_name, tuple(folders), tuple(folders.values()), router, prompts,
                                max_tokens=args.max_tokens, long_max_tokens=long_max)
            result = run_soak(target, requests=args.requests, clients=tuple(args.clients),
                              min_seconds=args.min_seconds, phase_seconds=args.phase_seconds,
                              hostile_share=args.hostile_share, warmup=args.warmup,
                              memory_tolerance=args.memory_tolerance, seed=args.seed, log=print)
            result["server_alive_at_end"] = server.alive()
    result = {"base": args.base, "quantization": args.quantization if args.base == "default" else "none",
              "requests": args.requests, "clients": args.clients, "min_seconds": args.min_seconds,
              "hostile_share": args.hostile_share, "max_tokens": args.max_tokens, "machine": platform.platform(),
              **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["checks"]), "passed" if result["passed"] else "FAILED")
    print(f"wrote {args.out}")
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
