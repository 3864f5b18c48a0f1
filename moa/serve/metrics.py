"""Prometheus metrics of ``moa serve``, on a registry of their own (one per app).

Counters and histograms are updated by the app as requests end; the gauges (queue depth,
running rows, resident adapters, load seconds, vLLM's ``vllm:lora_requests_info``) are
refreshed from the engine and the adapter cache at every scrape of ``/metrics``. Memory:
Prometheus' standard ``process_resident_memory_bytes`` and ``moa_process_pss_bytes`` (the
proportional set size, the fair measure when processes share pages).

``vllm:lora_requests_info`` has vLLM's exact shape, so LoRA-aware gateways (the Gateway
API inference extension, llm-d) read it as they read vLLM's: labels ``max_lora``,
``running_lora_adapters`` and ``waiting_lora_adapters`` (comma-separated adapter names),
value = the Unix time of the update (``set_to_current_time``); consumers take the series
with the newest value. Unlike vLLM, older label sets are dropped at each update, so the
series count stays at one.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        max_loras: The adapter cache's capacity (``None``: no limit; reported as the number
            of resident adapters in ``vllm:lora_requests_info``'s ``max_lora`` label).
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
            max_lora = max_lora if max_lora is not None else len(resident)
        self.lora_info.clear()
        self.lora_info.labels(
            max_lora=str(max_lora if max_lora is not None else 0),
            waiting_lora_adapters=",".join(waiting_adapters),
            running_lora_adapters=",".join(running_adapters),
        ).set_to_current_time()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _adapters_by_state(engine: Any) -> tuple[list[str], list[str]]:
    """(running, waiting) adapter names, from ``engine.running_adapters()`` when it has it,
    else every adapter in use counts as running."""
    split = getattr(engine, "running_adapters", None)
    if callable(split):
        running, waiting = split()
        return sorted(running), sorted(waiting)
    return sorted(n for n, c in engine.in_use().items() if c > 0), []
