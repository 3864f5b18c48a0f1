"""The serving engine: one thread owns the model and batches requests at every step.

Continuous (iteration-level) batching, as in Orca / vLLM / TGI: a new request joins the
running batch at the next step and a finished one leaves at once, so no row waits for
the longest. Each step:

1. run the admin calls queued by the app (adapter load/unload) — between two steps, so
   no forward ever sees the bank change under it;
2. drop cancelled rows (a client that went away);
3. admit queued requests up to ``max_batch_size``, each one's router decision made here,
   once, from its prompt alone (for ``auto``). With no row running, the requests admitted
   together are prefilled in ONE forward, their prompts packed end to end without padding
   (:mod:`moa.serve.packing`; a lone request gets exactly the ops of ``model.generate`` on
   it alone), and each one's first token is sampled;
4. decode one token for every running row in ONE forward: the rows' KV caches live in one
   left-padded batch cache (joined when a row arrives, sliced when one leaves), each row
   keeps its own routing (named, weighted or routed — moa's per-row routing puts them in
   one batch) and its own positions. Requests admitted while rows run are prefilled inside
   this same forward (a mixed step, :mod:`moa.serve.mixed_step`), so an arrival does not
   cost the running rows a forward of its own (``mixed_steps=False``: they are prefilled
   first, packed, as in 3).

Requests naming input-level adapters (prompt / prefix tuning) get their virtual positions
before the prompt, as ``model.generate`` gives them (:mod:`moa.serve.virtual_rows`); prompt-tuning
requests are packed and mixed like any other, prefix-tuning ones are prefilled alone (then
decoded in the shared batch).

``deterministic=True`` prefills and decodes each row alone instead (batch 1, its own cache): every
answer is then bit-identical to ``model.generate`` of that request alone, whatever else
is running, at the cost of batching (measured in ``benchmarks/serve_load.py``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from moa.serve import mixed_step, packing, virtual_rows
from moa.serve.batch_cache import BatchCache, cache_argument, layer_tensors, new_cache, prefill_inputs
from moa.serve.handle import RequestHandle
from moa.serve.openmp import release_idle_openmp_threads
from moa.serve.requests import (
    BadRequestError,
    EngineDeadError,
    GenerationRequest,
    OverloadedError,
    UnknownModelError,
)
from moa.serve.rows import Row, eos_ids

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """Continuous batching over one :class:`~moa.MixtureModel`.

    Args:
        model: The model (its tokenizer decodes the text). The engine is its only caller
            for generation while it runs.
        max_batch_size: Rows decoded together at most.
        max_queue: Requests waiting at most; more are refused (:class:`OverloadedError`).
        deterministic: Decode each row alone (answers bit-identical to ``generate`` alone).
        mixed_steps: Prefill requests that arrive while rows run inside the next decode
            step's forward (:mod:`moa.serve.mixed_step`) instead of a forward of their own.
            Needs a base with SDPA attention (else off); ignored when ``deterministic``.
        max_prompt_tokens: Longest prompt accepted (default: the base's context minus 1).
        max_prefill_tokens: Prompt tokens prefilled together in one packed forward at most
            (a longer prompt is prefilled alone); bounds how long one admission stalls the
            running rows' decoding.
    """

    def __init__(
        self,
        model: Any,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        deterministic: bool = False,
        mixed_steps: bool = True,
        max_prompt_tokens: int | None = None,
        max_prefill_tokens: int = 2048,
    ):
        if max_batch_size < 1:
            raise BadRequestError(f"max_batch_size must be >= 1; got {max_batch_size}.")
        self.model = model
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.deterministic = bool(deterministic)
        # Mixed steps switch the base's attention to moa's (plain SDPA outside them), so
        # they need an SDPA base; a deterministic engine runs every row alone anyway.
        self.mixed_steps = bool(mixed_steps) and not self.deterministic and mixed_step.enable(model)
        context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_context = context
        self.max_prompt_tokens = min(int(max_prompt_tokens or context - 1), context - 1)
        if max_prefill_tokens < 1:
            raise BadRequestError(f"max_prefill_tokens must be >= 1; got {max_prefill_tokens}.")
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.eos_ids = eos_ids(model)
        self._cache_key = cache_argument(model)
        self._cond = threading.Condition()
        self._waiting: collections.deque[Row] = collections.deque()
        self._admin: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._running: list[Row] = []
        self._admitting: list[Row] = []  # popped from the queue, being prefilled
        self._batch: BatchCache | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancel_on_stop = False
        self._dead: BaseException | None = None
        self.steps = 0
        self.prefill_forwards = 0  # prefill forwards run (a packed one counts once)
        self.prefilled_requests = 0
        self.mixed_steps_run = 0  # forwards that decoded and prefilled together
        self.busy_seconds = 0.0  # the loop's time working, not waiting (stats())

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (idempotent); frees the calling thread's idle OpenMP workers."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="moa-engine", daemon=True)
        self._thread.start()
        # The model was loaded on this thread: its idle OpenMP pool would halve the engine
        # thread's speed on a small CPU (moa.serve.openmp); the runtime restarts it if needed.
        release_idle_openmp_threads()

    @property
    def alive(self) -> bool:
        """Whether the loop runs and accepts requests."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping and self._dead is None

    def shutdown(self, timeout: float = 30.0, cancel: bool = False) -> None:
        """Stop accepting requests, finish (or cancel) the in-flight ones, stop the thread.

        Args:
            timeout: Seconds to wait for in-flight requests; after that they are cancelled.
            cancel: Cancel in-flight requests at once instead of finishing them.
        """
        with self._cond:
            self._stopping = True
            self._cancel_on_stop = cancel
            self._cond.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._cancel_on_stop = True
                self._cond.notify_all()
            self._thread.join(10)

    # -- client API ------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; returns its handle at once (raises as :meth:`submit_choices`)."""
        return self.submit_choices([request])[0]

    def submit_choices(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue ``n`` choices of one prompt (same prompt and routing; their own sampling and
        guides), prefilled once (:mod:`moa.serve.rows`); returns their handles at once.

        Raises:
            EngineDeadError: The engine is not running.
            BadRequestError: Empty or too long prompt, "auto" without a router, more choices
                than ``max_batch_size``.
            UnknownModelError: An adapter that is not loaded.
            RoutingError: A mixture of input-level adapters the model refuses.
            OverloadedError: The queue is full.
        """
        self._check_alive()
        request = requests[0]
        if len(requests) > self.max_batch_size:
            raise BadRequestError(f"n={len(requests)} choices exceed this server's batch of {self.max_batch_size} "
                                  f"rows (--max-batch-size); ask for fewer.", "n")
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise BadRequestError("The prompt is empty; give at least one token.")
        loaded = set(self.model.adapter_names)
        missing = [name for name in request.routing.adapters() if name not in loaded]
        if missing:
            raise UnknownModelError(
                f"Adapter {missing[0]!r} is not loaded. Loaded: {', '.join(sorted(loaded)) or 'none'}."
            )
        inputs = virtual_rows.split_row(self.model, request.routing.mixture)
        used = prompt_len + inputs.offset  # virtual positions count towards the context
        if prompt_len > self.max_prompt_tokens or used + request.params.max_tokens > self.max_context:
            virtual = f" (and {inputs.offset} virtual positions of its adapter)" if inputs.offset else ""
            raise BadRequestError(
                f"The prompt has {prompt_len} tokens{virtual} and asks for {request.params.max_tokens} more; this "
                f"server takes prompts up to {self.max_prompt_tokens} tokens and {self.max_context} in all. "
                f"Shorten the prompt or lower max_tokens."
            )
        if request.routing.auto and self.model.router is None:
            raise BadRequestError("This request asks the router ('auto'), but the server runs without one.")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        now = time.perf_counter()
        rows = [Row(r, RequestHandle(r, loop), self, now) for r in requests]
        for row in rows:
            row.use_inputs(inputs)
        with self._cond:
            if len(self._waiting) + (len(rows) if self.deterministic else 1) > self.max_queue:
                raise OverloadedError(
                    f"The server is busy: {len(self._waiting)} requests are already waiting "
                    f"(--max-queue {self.max_queue}). Retry shortly.",
                    retry_after=1.0,
                )
            if self.deterministic:  # every row is prefilled alone anyway
                self._waiting.extend(rows)
            else:
                rows[0].followers = rows[1:]
                self._waiting.append(rows[0])
            self._cond.notify_all()
        return [row.handle for row in rows]

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` on the engine thread between two steps; return its result (or raise)."""
        if threading.current_thread() is self._thread or self._thread is None or not self._thread.is_alive():
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._admin.append((fn, future))
            self._cond.notify_all()
        return future.result(timeout)

    def in_use(self) -> dict[str, int]:
        """Adapter -> number of waiting and running requests that use it."""
        counts: dict[str, int] = collections.Counter()
        with self._cond:
            rows = [*self._waiting, *self._running, *self._admitting]
        for row in rows:
            for name in row.adapters():
                counts[name] += 1
        return dict(counts)

    def stats(self) -> dict[str, float]:
        """Queue depth, running rows, batch size cap, decode steps, prefill forwards (mixed steps
        included), mixed steps so far, and ``busy_seconds``: the loop's time spent working rather
        than waiting for requests (its share of wall time says whether the engine is the bottleneck)."""
        with self._cond:
            return {"queued": len(self._waiting), "running": len(self._running),
                    "max_batch_size": self.max_batch_size, "steps": self.steps,
                    "prefill_forwards": self.prefill_forwards, "prefilled_requests": self.prefilled_requests,
                    "mixed_steps": self.mixed_steps_run, "busy_seconds": self.busy_seconds}

    def running_adapters(self) -> tuple[list[str], list[str]]:
        """(adapters of running rows, adapters of waiting rows), for the LoRA info gauge."""
        with self._cond:
            running = sorted({n for row in self._running for n in row.adapters()})
            waiting = sorted({n for row in self._waiting for n in row.adapters()})
        return running, waiting

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"The engine stopped after an error: {self._dead!r}. Restart the server.")
        if self._thread is None or not self._thread.is_alive() or self._stopping:
            raise EngineDeadError("The engine is not running (not started, or shutting down).")

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._one_iteration():
                    pass
        except BaseException as error:  # noqa: BLE001 - the engine dies; every client is told
            logger.exception("The engine loop crashed; failing every request.")
            self._dead = error
            self._fail_all(EngineDeadError(f"The engine crashed: {error!r}"))

    def _one_iteration(self) -> bool:
        with self._cond:
            while not (self._admin or self._waiting or self._running or self._stopping):
                self._cond.wait()
            admin = list(self._admin)
            self._admin.clear()
            if self._stopping and (self._cancel_on_stop or not (self._waiting or self._running)):
                stop = True
            else:
                stop = False
        started = time.perf_counter()  # work from here on; the wait above is idle time
        try:
            return self._work(admin, stop)
        finally:
            self.busy_seconds += time.perf_counter() - started

    def _work(self, admin: list, stop: bool) -> bool:
        """One iteration's work once woken: admin calls, then stop, or admit and step. False: stop."""
        for fn, future in admin:
            _run_admin(fn, future)
        if stop:
            self._cancel_all()
            return False
        self._drop_cancelled()
        if self.mixed_steps and self._running:
            self._step_admitting()
        else:
            self._admit()
            if self._running:
                self._decode()
        return True

    def _admit(self) -> None:
        """Prefill waiting requests (packed, in forwards of their own) while rows are free."""
        while len(self._running) < self.max_batch_size:
            rows = self._pop_waiting()
            if not rows:
                return
            self._join(rows, self._prefill(rows))

    def _pop_waiting(self) -> list[Row]:
        """Take the next requests to admit (:meth:`_take_waiting`), still counted by ``in_use()``."""
        with self._cond:
            rows = self._take_waiting(self.max_batch_size - len(self._running))
            self._admitting = rows
        return rows

    def _join(self, rows: list[Row], prefilled: list[Any]) -> None:
        """Add the prefilled rows (``None``: cancelled or failed) that are not finished to the batch."""
        with self._cond:
            self._admitting = []
            admitted = [(member, kv) for row, kv in zip(rows, prefilled, strict=True) if kv is not None
                        for member in row.take_group() if not member.finished]
            self._running.extend(row for row, _ in admitted)
        if not admitted:
            return
        if self.deterministic:
            for row, kv in admitted:
                row.cache = kv
        elif self._batch is None:
            self._batch = BatchCache.from_rows([kv for _, kv in admitted])
        else:
            self._batch.join_rows([kv for _, kv in admitted])

    def _take_waiting(self, free: int) -> list[Row]:
        """Pop the requests to prefill together: up to ``free`` rows (a group of ``n`` choices
        counts ``n``) and the token budget; one at a time in deterministic mode. Caller holds the lock."""
        rows: list[Row] = []
        tokens = width = 0
        limit = 1 if self.deterministic else free
        while self._waiting and width + self._waiting[0].width <= limit:
            size = len(self._waiting[0].request.prompt_ids) + self._waiting[0].offset
            if rows and tokens + size > self.max_prefill_tokens:
                break
            rows.append(self._waiting.popleft())
            tokens, width = tokens + size, width + rows[-1].width
        return rows

    def _prefill(self, rows: list[Row]) -> list[Any]:
        """Prefill ``rows`` and pick each one's first token.

        Returns, per row, its KV cache (the row's own ``DynamicCache`` in deterministic mode,
        else its per-layer keys/values), or ``None`` for a row that was cancelled or failed.
        Several rows are prefilled in one packed forward (a prefix-tuning row alone); if that
        forward fails, each row is retried alone, so one bad request never fails the others.
        """
        return self._prefill_started(rows, self._start(rows))

    def _start(self, rows: list[Row]) -> list[Row]:
        """Start the rows' prefill: drop the cancelled ones, ask the router for ``auto`` ones;
        returns those still alive."""
        live: list[Row] = []
        for row in rows:
            try:
                if row.handle.cancelled.is_set():
                    row.finish("cancelled")
                    continue
                row.start_prefill()
                self._decide(row)
                live.append(row)
            except Exception as error:  # noqa: BLE001 - one bad request must not stop the others
                self._fail(row, error)
        return live

    def _prefill_started(self, rows: list[Row], live: list[Row]) -> list[Any]:
        """:meth:`_prefill` of ``rows`` once :meth:`_start` gave the ``live`` ones."""
        caches: dict[int, Any] = {}
        packed = [row for row in live if row.packable]
        if len(packed) > 1:
            try:
                caches = dict(zip(map(id, packed), self._prefill_packed(packed), strict=True))
            except Exception as error:  # noqa: BLE001 - retried one by one below
                logger.warning("A packed prefill of %d requests failed (%s); prefilling them one by one.",
                               len(packed), error)
        for row in live:
            if id(row) in caches or row.finished:
                continue
            try:
                cache = self._prefill_alone(row)
                caches[id(row)] = cache if self.deterministic else layer_tensors(cache)
            except Exception as error:  # noqa: BLE001 - one bad request must not stop the others
                self._fail(row, error)
        return [caches.get(id(row)) for row in rows]

    @staticmethod
    def _fail(row: Row, error: Exception) -> None:
        logger.warning("Request %s failed in prefill: %s", row.request_id, error)
        row.fail(error)

    def _decide(self, row: Row) -> None:
        """The router's decision for an ``auto`` row, made once from its prompt alone, exactly
        as inside ``generate``'s prefill."""
        if row.request.routing.auto:
            model = self.model
            inputs = prefill_inputs(row.request.prompt_ids, model.device)
            mixture = model.route(inputs["input_ids"], attention_mask=inputs["attention_mask"])[0]
            row.set_decided(mixture, int(model.router.hidden_layer or 0))

    def _prefill_alone(self, row: Row) -> Any:
        """The ops of ``model.generate``'s prefill on this request alone; returns its cache."""
        model = self.model
        cache = new_cache(model)
        inputs = virtual_rows.prefill_alone_inputs(model, row.request.prompt_ids, row.virtual, cache)
        out = model(**inputs, **{self._cache_key: cache}, use_cache=True, logits_to_keep=row.prompt_logits,
                    check_finite=False, **row.routing_kwargs(model))
        self.prefill_forwards += 1
        self.prefilled_requests += 1
        row.accept_prefill(out.logits[0])
        return cache  # filled in place

    def _prefill_packed(self, rows: list[Row]) -> list[Any]:
        """One forward over the rows' prompts packed end to end (:mod:`moa.serve.packing`)."""
        model = self.model
        prompts = [row.prefill_ids for row in rows]  # virtual embeddings' slots, then the prompt
        lengths = [len(p) for p in prompts]
        inputs = packing.packed_inputs(prompts, model.device, model.base_model.dtype,
                                       [row.prompt_logits for row in rows])
        inputs = virtual_rows.embed_segments(model, inputs, [row.virtual for row in rows], lengths)
        routing = packing.packed_routing([row.linear for row in rows], [row.from_layer for row in rows],
                                         lengths, model.bank.names)
        cache = new_cache(model)
        # Checked: a NaN in one packed prompt reaches the others through attention's masked
        # products (0 * NaN), so non-finite logits fail the packing and each prompt runs alone.
        out = model(**inputs, **{self._cache_key: cache}, use_cache=True, **routing)
        self.prefill_forwards += 1
        self.prefilled_requests += len(rows)
        self._accept_first_tokens(rows, out.logits[0])
        return packing.split(layer_tensors(cache), lengths)

    def _accept_first_tokens(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each new row's first token (and prompt log-probabilities) from its prompt's kept logits,
        ``row.prompt_logits`` positions each, in order."""
        for row, kept in zip(rows, logits.split([row.prompt_logits for row in rows]), strict=True):
            try:
                row.accept_prefill(kept)
            except Exception as error:  # noqa: BLE001 - this row only
                self._fail(row, error)

    def _step_admitting(self) -> None:
        """Decode the running rows and prefill newly admitted requests in ONE forward.

        A mixed step (:mod:`moa.serve.mixed_step`); with nothing to admit it is a plain decode
        step. If the mixed forward fails, the batch cache is put back as it was and the new
        requests are prefilled on their own (:meth:`_prefill`), so no row is lost.
        """
        rows = self._pop_waiting()
        live = self._start(rows) if rows else []
        mixed = [row for row in live if row.packable]  # prefix-tuning rows are prefilled alone
        if not mixed:
            self._join(rows, self._prefill_started(rows, live) if live else [None] * len(rows))
            self._decode()
            return
        running = list(self._running)
        try:
            logits, prompt_kv = self._mixed_forward(running, mixed)
        except Exception as error:  # noqa: BLE001 - the new requests are prefilled the other way
            logger.warning("A mixed decode + prefill step failed (%s); prefilling the %d new requests on "
                           "their own.", error, len(live))
            self._join(rows, self._prefill_started(rows, live))
            self._decode()
            return
        for i, row in enumerate(running):
            row.accept(logits[i])
        self._accept_first_tokens(mixed, logits[len(running):])
        self._remove([i for i, row in enumerate(running) if row.finished])
        alone = [row for row in live if not row.packable]
        by_row = dict(zip(map(id, mixed), prompt_kv, strict=True))
        by_row.update(zip(map(id, alone), self._prefill_started(alone, alone), strict=True))
        self._join(rows, [by_row.get(id(row)) for row in rows])

    def _mixed_forward(self, running: list[Row], live: list[Row]) -> tuple[torch.Tensor, list[Any]]:
        """The mixed step's forward: per kept position its logits (running rows, then new
        prompts), and each new prompt's keys/values. The batch cache grows by one column."""
        batch = self._batch
        assert batch is not None
        logits, prompt_kv = mixed_step.run(self.model, batch, running, live, self._cache_key)
        self.steps += 1
        self.mixed_steps_run += 1
        self.prefill_forwards += 1
        self.prefilled_requests += len(live)
        return logits, prompt_kv

    def _decode(self) -> None:
        rows = list(self._running)
        self.steps += 1
        if self.deterministic:
            for row in rows:
                inputs = {"input_ids": torch.tensor([[row.last_token]], device=self.model.device),
                          "position_ids": torch.tensor([[row.position]], device=self.model.device)}
                out = self.model(**inputs, attention_mask=torch.ones(1, row.length + row.offset, dtype=torch.long),
                                 **{self._cache_key: row.cache}, use_cache=True, check_finite=False,
                                 **row.routing_kwargs(self.model))
                row.accept(out.logits[0, -1])
        else:
            batch = self._batch
            assert batch is not None
            inputs = batch.step_inputs([row.last_token for row in rows], [row.position for row in rows],
                                       self.model.device, self._cache_key)
            kwargs = Row.batch_routing_kwargs(rows, self.model)
            out = self.model(**inputs, use_cache=True, check_finite=False, **kwargs)
            batch.advance()
            for i, row in enumerate(rows):
                row.accept(out.logits[i, -1])
        self._remove([i for i, row in enumerate(rows) if row.finished])

    def _remove(self, indices: list[int]) -> None:
        if not indices:
            return
        gone = set(indices)
        with self._cond:
            self._running = [row for i, row in enumerate(self._running) if i not in gone]
        if self._batch is not None:
            if self._running:
                self._batch.keep([i for i in range(self._batch.size) if i not in gone])
            else:
                self._batch = None

    def _drop_cancelled(self) -> None:
        cancelled = [i for i, row in enumerate(self._running) if row.handle.cancelled.is_set()]
        for i in cancelled:
            self._running[i].finish("cancelled")
        self._remove(cancelled)
        with self._cond:
            waiting = [row for row in self._waiting if row.handle.cancelled.is_set()]
            for row in waiting:
                self._waiting.remove(row)
        for row in waiting:
            row.finish("cancelled")

    def _cancel_all(self) -> None:
        with self._cond:
            rows = [*self._running, *self._waiting]
            self._running, self._batch = [], None
            self._waiting.clear()
        for row in rows:
            if not row.finished:
                row.finish("cancelled")

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            rows = [*self._running, *self._waiting]
            admin = list(self._admin)
            self._running, self._batch = [], None
            self._waiting.clear()
            self._admin.clear()
        for row in (member for row in rows for member in row.group()):
            if not row.handle.done:
                row.handle.finish(None, error)
        for _, future in admin:
            future.set_exception(error)


def _run_admin(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as error:  # noqa: BLE001 - handed to the caller
        future.set_exception(error)
