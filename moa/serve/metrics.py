"""Prometheus metrics of ``moa serve``, on a registry of their own (one per app).

Counters and histograms are updated by the app as requests end; the gauges (queue depth,
running rows, resident adapters, load seconds, vLLM's ``vllm:lora_requests_info``) are
refreshed from the engine and the adapter cache at every scrape of ``/metrics``. Memory:
Prometheus' standard ``process_resident_memory_bytes`` and ``moa_process_pss_bytes`` (the
proportional set size, the fair measure when processes share pages).

``vllm:lora_requests_info`` has vLLM's exact semantics, so LoRA-aware gateways (the Gateway
API Inference Extension's endpoint picker, llm-d) read it as they read vLLM's:

* labels ``running_lora_adapters`` and ``waiting_lora_adapters``: the adapters of the running
  and of the waiting requests, comma-joined (sorted; ``""`` when none) — a mixture's row counts
  each of its adapters; ``max_lora``: how many adapters the server holds at once (the adapter
  cache's ``max_loras``; without a limit, the number of adapters it may load);
* value: the Unix time the label set was last updated (vLLM's ``set_to_current_time``);
* always present, one series even when nothing runs (both adapter labels ``""``).

The picker keeps the series with the largest value and skips those whose two adapter labels
are empty ("use the last set of active adapters"). vLLM keeps every label set it ever set,
so that last active set is still there when the server goes idle; moa keeps exactly that
one instead of all of them: at each update the series are the current label set and, while
it is empty, the last non-empty one with the time it was last seen. So at most two series.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from moa.serve.process_memory import proportional_set_size_bytes

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)


def adapter_label(routing: Mapping[str, float]) -> str:
    """The ``adapter`` label of a request's routing: ``base``, the adapter, or ``mixture``."""
    used = [name for name, w in routing.items() if w > 0]
    if not used:
        return "base"
    return used[0] if len(used) == 1 else "mixture"


class ServeMetrics:
    """Every metric of one server.

    Args:
        max_loras: ``vllm:lora_requests_info``'s ``max_lora`` when :meth:`refresh` gets no
            adapter cache (with one, the cache's live value is reported).
    """

    def __init__(self, max_loras: int | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_loras = max_loras
        r = self.registry
        self.requests = Counter(
            "moa_requests", "Finished requests by requested model, adapter (base, a name, mixture) and finish reason.",
            ["model", "adapter", "finish_reason"], registry=r)
        self.adapter_requests = Counter(
            "moa_adapter_requests", "Finished requests that used each adapter (with weight > 0, routed or named).",
            ["adapter"], registry=r)
        self.errors = Counter("moa_request_errors", "Requests answered with an error, by HTTP status.",
                              ["status"], registry=r)
        self.prompt_tokens = Counter("moa_prompt_tokens", "Prompt tokens of finished requests.", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("moa_generation_tokens", "Generated tokens of finished requests.",
                                         ["model"], registry=r)
        self.e2e_latency = Histogram("moa_e2e_request_latency_seconds", "Time from arrival to the last token.",
                                     ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("moa_time_to_first_token_seconds", "Time from arrival to the first token.",
                                     ["model"], buckets=_FIRST_TOKEN_BUCKETS, registry=r)
        self.queue_time = Histogram("moa_request_queue_time_seconds", "Time a request waited before its prefill.",
                                    ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("moa_num_requests_waiting", "Requests queued, not yet admitted.", registry=r)
        self.running = Gauge("moa_num_requests_running", "Rows in the running batch.", registry=r)
        # vLLM's names for the same two numbers: gateways route on them.
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                  registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                                  registry=r)
        self.resident = Gauge("moa_adapters_resident", "Adapters loaded in the model now.", registry=r)
        self.load_seconds = Gauge("moa_adapter_load_seconds", "Seconds the latest load of each resident adapter took.",
                                  ["adapter"], registry=r)
        self.evictions = Gauge("moa_adapter_evictions", "Adapters evicted (LRU) since start.", registry=r)
        self.busy = Gauge("moa_engine_busy_seconds", "Seconds the engine loop has spent working (not waiting "
                          "for requests) since start; its rate near 1 means the engine is the bottleneck.",
                          registry=r)
        # the standard process_* series (resident and virtual memory, CPU seconds, open files) every exporter has
        ProcessCollector(registry=r)
        self.pss = Gauge("moa_process_pss_bytes", "Proportional set size of this process: resident memory with "
                         "shared pages divided among the processes that map them (Linux; NaN elsewhere).", registry=r)
        self.pss.set_function(proportional_set_size_bytes)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                               ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=r)
        self._last_active: tuple[dict[str, str], float] | None = None  # labels, time last seen

    # -- per request -----------------------------------------------------------------------

    def observe_completion(self, model: str, completion: Any, *, seconds_total: float,
                           seconds_to_first_token: float | None) -> None:
        """Count one finished request (any finish reason, cancelled too)."""
        self.requests.labels(model, adapter_label(completion.routing), completion.finish_reason).inc()
        for name, weight in completion.routing.items():
            if weight > 0:
                self.adapter_requests.labels(name).inc()
        self.prompt_tokens.labels(model).inc(completion.prompt_tokens)
        self.generation_tokens.labels(model).inc(completion.completion_tokens)
        self.e2e_latency.labels(model).observe(seconds_total)
        self.queue_time.labels(model).observe(completion.seconds_queued)
        if seconds_to_first_token is not None:
            self.first_token.labels(model).observe(seconds_to_first_token)

    def observe_error(self, status: int) -> None:
        """Count one error answer."""
        self.errors.labels(str(status)).inc()

    # -- per scrape ------------------------------------------------------------------------

    def refresh(self, engine: Any, cache: Any | None) -> None:
        """Set the gauges from the engine's and the cache's state now."""
        stats = engine.stats()
        queued, running = int(stats.get("queued", 0)), int(stats.get("running", 0))
        self.waiting.set(queued)
        self.running.set(running)
        self.vllm_waiting.set(queued)
        self.vllm_running.set(running)
        self.busy.set(float(stats.get("busy_seconds", 0.0)))
        running_adapters, waiting_adapters = _adapters_by_state(engine)
        max_lora = self.max_loras
        if cache is not None:
            resident = cache.resident()
            self.resident.set(len(resident))
            self.evictions.set(cache.evictions)
            self.load_seconds.clear()
            for name, seconds in cache.load_seconds().items():
                self.load_seconds.labels(name).set(seconds)
            max_lora = _max_lora(cache, resident)
        self.set_lora_info(running_adapters, waiting_adapters, max_lora or 0)

    def set_lora_info(self, running: Sequence[str], waiting: Sequence[str], max_lora: int,
                      now: float | None = None) -> None:
        """Update ``vllm:lora_requests_info`` (see the module docstring) to this state, at ``now``
        (default: the current Unix time)."""
        now = time.time() if now is None else now
        labels = {"max_lora": str(max_lora), "waiting_lora_adapters": ",".join(waiting),
                  "running_lora_adapters": ",".join(running)}
        self.lora_info.clear()
        if running or waiting:
            self._last_active = (labels, now)
        elif self._last_active is not None:  # idle: the picker reads the last active set
            last, seen = self._last_active
            self.lora_info.labels(**last).set(seen)
        self.lora_info.labels(**labels).set(now)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _max_lora(cache: Any, resident: Sequence[str]) -> int:
    """``max_lora``: the cache's ``max_loras``; without a limit, every adapter it may load."""
    if cache.max_loras is not None:
        return int(cache.max_loras)
    return max(len(resident), len(cache.registered()))


def _adapters_by_state(engine: Any) -> tuple[list[str], list[str]]:
    """(running, waiting) adapter names, from ``engine.running_adapters()`` when it has it,
    else every adapter in use counts as running."""
    split = getattr(engine, "running_adapters", None)
    if callable(split):
        running, waiting = split()
        return sorted(running), sorted(waiting)
    return sorted(n for n, c in engine.in_use().items() if c > 0), []
