"""The serving engine: one thread owns the model and runs a step after another.

Continuous (iteration-level) batching, as in Orca / vLLM / TGI: a new request joins the
running batch at the next step and a finished one leaves at once, so no row waits for
the longest. The work is split as in vLLM v1:

* the :class:`~moa.serve.scheduler.Scheduler` decides what each step runs (queues, batch
  slots, the token budget, prompt chunks) and knows nothing of the model;
* the :class:`~moa.serve.model_runner.ModelRunner` runs the forwards (packed prefills, mixed
  decode + prefill steps, decode steps, requests alone) and owns the batch KV cache;
* each row's :class:`~moa.serve.output.OutputProcessor` picks its tokens, streams its text and
  decides its end.

The engine (this module) runs the loop. Each step:

1. run the admin calls queued by the app (adapter load/unload) — between two steps, so
   no forward ever sees the bank change under it;
2. drop cancelled requests (a client that went away);
3. with rows running (and mixed steps on, the default): ONE forward decodes every running row
   and prefills the prompt chunks the scheduler fits beside them (:mod:`moa.serve.mixed_step`);
   a long prompt is spread over several steps, so the running rows keep their pace. With
   nothing running: the waiting prompts are prefilled whole, packed end to end in one forward
   (:mod:`moa.serve.packing`; a lone request gets exactly the ops of ``model.generate`` on it
   alone), and each one's first token is picked.

Each row keeps its own routing (named, weighted, routed by a sequence-level router once from
its prompt, or by a token-level router at every token, as ``generate`` does). Requests naming
prefix-tuning adapters and requests routed per token are prefilled alone, then decoded in the
shared batch.

Faults stay with their request: an error while starting, routing, sampling or detokenizing one
row fails that request only (an OpenAI-shaped error); a failed packed or mixed forward is
retried with each new request on its own. A decode forward that fails fails the requests in
it, and the engine serves on. Only an error outside any step's work (a bug) stops the engine.

``deterministic=True`` prefills and decodes each row alone instead (batch 1, its own cache): every
answer is then bit-identical to ``model.generate`` of that request alone, whatever else
is running, at the cost of batching (measured in ``benchmarks/serve_load.py``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from moa.serve import mixed_step, virtual_rows
from moa.serve.admin_calls import AdminCalls
from moa.serve.handle import RequestHandle
from moa.serve.model_runner import ModelRunner
from moa.serve.openmp import release_idle_openmp_threads
from moa.serve.output import OutputLimits
from moa.serve.prefix_cache import PrefixCache, routing_key
from moa.serve.requests import (
    BadRequestError,
    EngineDeadError,
    GenerationRequest,
    UnknownModelError,
)
from moa.serve.rows import Row, eos_ids
from moa.serve.scheduler import Chunk, Scheduler

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds an admin call waits to run on the engine thread before it is withdrawn.
ADMIN_TIMEOUT = 120.0


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
        max_prefill_tokens: Prompt tokens prefilled together in one packed forward when no row
            runs (a longer prompt is prefilled alone).
        max_step_tokens: Tokens of one mixed step (one per running row, the rest prompt
            chunks): bounds how much an arriving prompt slows the running rows' steps.
        admin_timeout: Seconds an admin call may wait for the engine thread.
        prefix_cache_bytes: Keys/values of prompt prefixes kept for reuse
            (:mod:`moa.serve.prefix_cache`; 0: off). Needs mixed steps; off when deterministic.
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
        max_step_tokens: int = 128,
        admin_timeout: float = ADMIN_TIMEOUT,
        prefix_cache_bytes: int = 256 * 2**20,
    ):
        self.model = model
        self.deterministic = bool(deterministic)
        self.scheduler = Scheduler(max_batch_size=max_batch_size, max_queue=max_queue,
                                   max_prefill_tokens=max_prefill_tokens, max_step_tokens=max_step_tokens,
                                   one_at_a_time=self.deterministic)
        # Mixed steps switch the base's attention to moa's (plain SDPA outside them), so
        # they need an SDPA base; a deterministic engine runs every row alone anyway.
        self.mixed_steps = bool(mixed_steps) and not self.deterministic and mixed_step.enable(model)
        self.runner = ModelRunner(model, deterministic=self.deterministic)
        context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_context = context
        self.max_prompt_tokens = min(int(max_prompt_tokens or context - 1), context - 1)
        self.eos_ids = eos_ids(model)
        self.limits = OutputLimits(self.eos_ids, context, model.tokenizer)
        self.admin_timeout = float(admin_timeout)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if self.mixed_steps and prefix_cache_bytes > 0 else None
        self._adapters_seen = model.bank.layout_version  # the prefix cache is cleared when adapters change
        self._admin = AdminCalls(self.scheduler.cond)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancel_on_stop = False
        self._dead: BaseException | None = None
        self.busy_seconds = 0.0  # the loop's time working, not waiting (stats())

    @property
    def max_batch_size(self) -> int:
        """Rows decoded together at most."""
        return self.scheduler.max_batch_size

    @property
    def max_queue(self) -> int:
        """Requests waiting at most."""
        return self.scheduler.max_queue

    @property
    def steps(self) -> int:
        """Decode steps run (mixed steps included)."""
        return self.runner.steps

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
        Admin calls not run by then fail with :class:`EngineDeadError`.

        Args:
            timeout: Seconds to wait for in-flight requests; after that they are cancelled.
            cancel: Cancel in-flight requests at once instead of finishing them.
        """
        cond = self.scheduler.cond
        with cond:
            self._stopping = True
            self._cancel_on_stop = cancel
            self._admin.close()
            cond.notify_all()
        if self._thread is None:
            self._admin.fail_all(EngineDeadError("The engine was shut down before it started."))
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with cond:
                self._cancel_on_stop = True
                cond.notify_all()
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
        rows = [Row(r, RequestHandle(r, loop), self.limits, now) for r in requests]
        for row in rows:
            row.use_inputs(inputs)
        if not self.deterministic:  # a deterministic engine prefills every row alone anyway
            rows[0].followers = rows[1:]
            rows = rows[:1]
        self.scheduler.enqueue(rows)
        return [row.handle for row in [rows[0], *rows[0].followers, *rows[1:]]]

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``fn`` on the engine thread between two steps; return its result (or raise).

        Raises:
            EngineTimeoutError: it did not get to run within ``timeout`` (default
                ``admin_timeout``) seconds; it is withdrawn if it had not started.
            EngineDeadError: the engine stopped before running it.
        """
        if threading.current_thread() is self._thread or self._thread is None or not self._thread.is_alive():
            return fn()
        return self._admin.submit(fn, self.admin_timeout if timeout is None else timeout)

    def in_use(self) -> dict[str, int]:
        """Adapter -> number of waiting, prefilling and running requests that use it."""
        return self.scheduler.in_use()

    def stats(self) -> dict[str, float]:
        """Queue depth, requests prefilling (chunked) and running, batch size cap, admin calls
        waiting, decode steps, prefill forwards (mixed steps included), mixed steps, chunks of
        prompts split over several steps, the prefix cache's blocks, bytes and prompt tokens looked
        up and found (when on), and ``busy_seconds``: the loop's time spent working rather than
        waiting for requests (its share of wall time says whether the engine is the bottleneck)."""
        runner = self.runner
        with self.scheduler.cond:
            admin = len(self._admin)
        return {**self.scheduler.counts(), "max_batch_size": self.max_batch_size, "admin_pending": admin,
                "steps": runner.steps,
                "prefill_forwards": runner.prefill_forwards, "prefilled_requests": runner.prefilled_requests,
                "mixed_steps": runner.mixed_steps_run, "prompt_chunks": runner.prompt_chunks,
                **(self.prefix_cache.stats() if self.prefix_cache is not None else {}),
                "busy_seconds": self.busy_seconds}

    def running_adapters(self) -> tuple[list[str], list[str]]:
        """(adapters of running rows, adapters of waiting rows), for the LoRA info gauge."""
        return self.scheduler.adapters_by_state()

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
            return
        self._admin.fail_all(EngineDeadError("The engine stopped before running this adapter change."))

    def _one_iteration(self) -> bool:
        scheduler = self.scheduler
        with scheduler.cond:
            while not (self._admin or scheduler.has_work() or self._stopping):
                scheduler.cond.wait()
            admin = self._admin.take()
            stop = self._stopping and (self._cancel_on_stop or not scheduler.has_work())
        started = time.perf_counter()  # work from here on; the wait above is idle time
        try:
            self._admin.run(admin)
            if stop:
                self._cancel_all()
                return False
            if self.prefix_cache is not None and self.model.bank.layout_version != self._adapters_seen:
                self.prefix_cache.clear()  # an adapter changed (maybe reloaded under its name)
                self._adapters_seen = self.model.bank.layout_version
            self._drop_cancelled()
            if self.mixed_steps and (scheduler.running or scheduler.prefilling):
                self._mixed_step()
            else:
                self._prefill_step()
                if scheduler.running:
                    self._decode_step()
            return True
        finally:
            self.busy_seconds += time.perf_counter() - started

    # -- steps -----------------------------------------------------------------------------

    def _prefill_step(self) -> None:
        """Prefill waiting requests whole (packed, in forwards of their own) while slots are free."""
        while True:
            plan = self.scheduler.plan_prefill()
            if not plan.admitted:
                return
            live = self._start(plan.admitted)
            continued = self._prefill_continued([row for row in live if row.prefilled])
            caches = {id(row): cache for row, cache in continued}
            whole = [row for row in live if id(row) not in caches]
            caches.update(zip(map(id, whole), self._prefill_whole(whole), strict=True))
            self._finish_prefill(plan.admitted, [caches.get(id(row)) for row in plan.admitted])

    def _mixed_step(self) -> None:
        """Decode the running rows and prefill the planned prompt chunks in ONE forward.

        If that forward fails, the batch cache is put back as it was, new whole prompts are
        prefilled on their own, a prompt already split over steps fails (its earlier chunks
        cannot be redone here), and the running rows decode in a step of their own.
        """
        scheduler = self.scheduler
        plan = scheduler.plan_step()
        live = {id(row) for row in self._start(plan.admitted)}
        dead = [row for row in plan.admitted if id(row) not in live]
        chunks = [c if c.start or not c.row.prefilled else Chunk(c.row, c.row.prefilled,
                                                                 min(c.row.prefill_total, c.row.prefilled + c.size))
                  for c in plan.chunks if c.start or id(c.row) in live]  # a cached prefix skips its blocks
        alone = [c.row for c in chunks if not c.row.packable]  # prefix / per-token rows: whole, alone
        mixed = [c for c in chunks if c.row.packable]
        running = list(scheduler.running)
        if not mixed:
            self._separately(running, [], alone, dead)
            return
        try:
            logits, chunk_logits, chunk_kv = self.runner.mixed(running, mixed)
        except Exception as error:  # noqa: BLE001 - the new requests are prefilled the other way
            logger.warning("A mixed decode + prefill step failed (%s); prefilling the new requests on their own.",
                           error)
            for chunk in mixed:
                if chunk.start == chunk.row.cached_prefix and chunk.last:
                    chunk.row.forget_prefill()  # only its cached prefix: prefilled whole instead
                elif chunk.start or not chunk.last:
                    chunk.row.fail(error)
            self._separately(running, [c.row for c in mixed], alone, dead)
            return
        self._accept_decoded(running, logits)
        done = self._accept_chunks(mixed, chunk_logits, chunk_kv)
        leaving = [*dead, *(row for row, _ in done), *alone]
        caches = [None] * len(dead) + [kv for _, kv in done] + self._prefill_whole(alone)
        self._finish_prefill(leaving, caches)

    def _separately(self, running: list[Row], mixed: list[Row], alone: list[Row], dead: list[Row]) -> None:
        """A step without a mixed forward: decode the running rows, then prefill the new whole
        prompts (``mixed``, ``alone``) in forwards of their own; ``dead`` (and failed) rows leave."""
        if running:
            self._decode_step()
        whole = [row for row in [*mixed, *alone] if not row.finished]
        gone = dead + [row for row in mixed if row.finished]
        self._finish_prefill([*gone, *whole], [None] * len(gone) + self._prefill_whole(whole))

    def _decode_step(self) -> None:
        """One decode step of the running rows. If its forward fails, its rows fail (with the
        error) and the engine goes on with the waiting requests."""
        running = list(self.scheduler.running)
        try:
            logits = self.runner.decode(running)
        except Exception as error:  # noqa: BLE001 - these rows only; the engine serves on
            logger.exception("A decode step of %d requests failed; failing them.", len(running))
            for row in running:
                row.fail(error)
            self.scheduler.remove_running(range(len(running)))
            self.runner.clear()
            return
        self._accept_decoded(running, logits)

    # -- rows in and out -------------------------------------------------------------------

    def _start(self, rows: Sequence[Row]) -> list[Row]:
        """Start the rows' prefill: finish the cancelled ones, route ``auto`` ones; returns those
        still alive (the others have ended, with their error)."""
        live: list[Row] = []
        for row in rows:
            try:
                if row.cancelled:
                    row.finish("cancelled")
                    continue
                row.start_prefill()
                self.runner.decide(row)
                self._reuse_prefix(row)
                live.append(row)
            except Exception as error:  # noqa: BLE001 - one bad request must not stop the others
                logger.warning("Request %s failed before its prefill: %s", row.request_id, error)
                row.fail(error)
        return live

    def _reuse_prefix(self, row: Row) -> None:
        """Start ``row``'s prefill after the longest prefix the cache holds for its routing."""
        if self.prefix_cache is None or not row.chunkable:
            return
        found, kv = self.prefix_cache.lookup(row.request.prompt_ids, routing_key(row.route.linear,
                                                                                  row.route.from_layer))
        if found:
            row.prefilled, row.prompt_kv, row.cached_prefix = found, kv, found

    def _prefill_continued(self, rows: Sequence[Row]) -> list[tuple[Row, Any]]:
        """Prefill the rest of prompts whose prefix came from the cache, in one forward with no
        running row; returns the rows done, with their caches. If it fails, the rows forget their
        prefix (to be prefilled whole)."""
        if not rows:
            return []
        chunks = [Chunk(row, row.prefilled, row.prefill_total) for row in rows]
        try:
            _, logits, kvs = self.runner.mixed([], chunks)
        except Exception as error:  # noqa: BLE001 - prefilled whole instead
            logger.warning("Prefilling %d requests after their cached prefix failed (%s); prefilling them whole.",
                           len(rows), error)
            for row in rows:
                row.forget_prefill()
            return []
        return self._accept_chunks(chunks, logits, kvs)

    def _prefill_whole(self, rows: Sequence[Row]) -> list[Any]:
        """Prefill ``rows``' whole prompts and pick each one's first token.

        Returns, per row, its KV cache (``None`` for a row that failed). Several rows are
        prefilled in one packed forward (prefix-tuning and per-token rows alone); if that forward
        fails, each row is retried alone, so one bad request never fails the others.
        """
        caches: dict[int, Any] = {}
        packed = [row for row in rows if row.packable and not row.finished]
        if len(packed) > 1:
            try:
                logits, kvs = self.runner.prefill_packed(packed)
            except Exception as error:  # noqa: BLE001 - retried one by one below
                logger.warning("A packed prefill of %d requests failed (%s); prefilling them one by one.",
                               len(packed), error)
            else:
                for row, kept, kv in zip(packed, logits, kvs, strict=True):
                    row.accept_prefill(kept)
                    caches[id(row)] = kv
        for row in rows:
            if id(row) in caches or row.finished:
                continue
            try:
                kept, cache = self.runner.prefill_alone(row)
                row.accept_prefill(kept)
                caches[id(row)] = cache
            except Exception as error:  # noqa: BLE001 - one bad request must not stop the others
                logger.warning("Request %s failed in prefill: %s", row.request_id, error)
                row.fail(error)
        return [caches.get(id(row)) for row in rows]

    def _accept_chunks(self, chunks: Sequence[Chunk], logits: Sequence[torch.Tensor],
                       kvs: Sequence[Any]) -> list[tuple[Row, Any]]:
        """Record the step's prompt chunks; returns the rows whose prefill ended, with their cache."""
        done = []
        for chunk, kept, kv in zip(chunks, logits, kvs, strict=True):
            row = chunk.row
            if not chunk.last:
                row.prefilled, row.prompt_kv = chunk.stop, kv
                continue
            row.prompt_kv = None
            row.accept_prefill(kept)
            done.append((row, kv))
        return done

    def _finish_prefill(self, rows: Sequence[Row], caches: Sequence[Any]) -> None:
        """``rows`` left the prefill; their live members (with a cache) join the batch, and the
        prefix cache keeps their prompts' blocks."""
        members, member_caches = [], []
        for row, cache in zip(rows, list(caches) + [None] * (len(rows) - len(caches)), strict=True):
            if cache is not None and self.prefix_cache is not None and row.chunkable:
                self.prefix_cache.insert(row.request.prompt_ids, routing_key(row.route.linear, row.route.from_layer),
                                         cache)
            for member in row.take_group():
                if cache is not None and not member.finished:
                    members.append(member)
                    member_caches.append(cache)
        self.scheduler.prefill_done(rows, members)
        self.runner.join(members, member_caches)

    def _accept_decoded(self, rows: Sequence[Row], logits: torch.Tensor) -> None:
        """Each running row's next token from its logits; finished rows leave the batch."""
        for i, row in enumerate(rows):
            row.accept(logits[i])
        self._remove([i for i, row in enumerate(rows) if row.finished])

    def _remove(self, indices: Sequence[int]) -> None:
        size = len(self.scheduler.running)
        self.scheduler.remove_running(indices)
        self.runner.keep(size, indices)

    def _drop_cancelled(self) -> None:
        running, prefilling, waiting = self.scheduler.take_cancelled()
        rows = self.scheduler.running
        for i in running:
            rows[i].finish("cancelled")
        self._remove(running)
        for row in [*prefilling, *waiting]:
            row.finish("cancelled")

    def _cancel_all(self) -> None:
        rows = self.scheduler.drain()
        self.runner.clear()
        for row in rows:
            if not row.finished:
                row.finish("cancelled")

    def _fail_all(self, error: BaseException) -> None:
        rows = self.scheduler.drain()
        self.runner.clear()
        for row in (member for row in rows for member in row.group()):
            if not row.handle.done:
                row.handle.finish(None, error)
        self._admin.fail_all(error)
