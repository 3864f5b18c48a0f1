"""Which requests run at the next engine step: queues, batch slots, the token budget, chunks.

The scheduler is pure bookkeeping (no model, no tensors; unit-tested on its own, as vLLM v1's
scheduler is). It holds three lists, under one condition variable the engine thread sleeps on:

* ``waiting``: submitted requests, first come first served;
* ``prefilling``: requests whose prompt is being prefilled in chunks (they hold a batch slot);
* ``running``: requests that decode one token per step, in the batch cache's row order.

Each step the engine asks for a :class:`StepPlan`:

* with nothing running (:meth:`Scheduler.plan_prefill`; also whenever mixed steps are off),
  waiting prompts are prefilled whole, packed together up to ``max_prefill_tokens``: nobody
  waits on a decode, so the fastest first token wins;
* with rows running (:meth:`Scheduler.plan_step`), the step's forward decodes every running row
  and prefills prompt *chunks* in the tokens left of ``max_step_tokens`` (running rows count one
  each), as vLLM's chunked prefill and Sarathi-Serve do: a long prompt no longer stalls the
  running rows for a whole prefill, it is spread over several steps. A prompt that cannot be
  split (:attr:`Schedulable.chunkable` false: prefix tuning, prompt log-probabilities, a token-level
  router) is taken whole, but only when no other chunk is in the step, so every step makes
  progress and the budget is exceeded by at most one such prompt.

Groups of ``n`` choices queue as one entry of :attr:`Schedulable.width` rows.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from moa.serve.requests import BadRequestError, OverloadedError


class Schedulable(Protocol):
    """What the scheduler reads of a request (:class:`~moa.serve.rows.Row` implements it)."""

    @property
    def width(self) -> int:
        """Batch rows it takes (its ``n`` choices)."""

    @property
    def prefill_total(self) -> int:
        """Tokens its prefill runs in all (virtual embeddings and prompt)."""

    @property
    def prefilled(self) -> int:
        """Tokens of it already prefilled (earlier chunks)."""

    @property
    def chunkable(self) -> bool:
        """Whether its prompt may be split across steps."""

    @property
    def cancelled(self) -> bool:
        """Whether its client went away."""

    def adapters(self) -> tuple[str, ...]:
        """Adapters it uses."""


@dataclass(frozen=True)
class Chunk:
    """Tokens ``start:stop`` of one request's prefill sequence, run in this step."""

    row: Any
    start: int
    stop: int

    @property
    def last(self) -> bool:
        """Whether this chunk ends the prompt (the request then picks its first token)."""
        return self.stop >= self.row.prefill_total

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class StepPlan:
    """One step's work.

    Attributes:
        admitted: Requests taken off the queue in this step (to be started: cancelled ones
            dropped, ``auto`` ones routed); their chunks are in ``chunks``.
        chunks: Prompt pieces to prefill, the requests already prefilling first.
    """

    admitted: list[Any] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)

    def drop(self, rows: Sequence[Any]) -> None:
        """Forget the chunks of ``rows`` (cancelled or failed before the forward)."""
        gone = {id(row) for row in rows}
        self.chunks = [chunk for chunk in self.chunks if id(chunk.row) not in gone]


class Scheduler:
    """Queues, slots and token budget of one engine.

    Args:
        max_batch_size: Rows running (and prefilling) together at most.
        max_queue: Waiting requests at most; more are refused with :class:`OverloadedError`.
        max_prefill_tokens: Prompt tokens prefilled together when nothing runs.
        max_step_tokens: Tokens of one step while rows run: one per running row, the rest for
            prompt chunks.
        one_at_a_time: Admit one request per step and never chunk (deterministic engines).
    """

    def __init__(self, *, max_batch_size: int = 16, max_queue: int = 64, max_prefill_tokens: int = 2048,
                 max_step_tokens: int = 128, one_at_a_time: bool = False):
        for name, value in (("max_batch_size", max_batch_size), ("max_prefill_tokens", max_prefill_tokens),
                            ("max_step_tokens", max_step_tokens)):
            if value < 1:
                raise BadRequestError(f"{name} must be >= 1; got {value}.")
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.max_step_tokens = int(max_step_tokens)
        self.one_at_a_time = bool(one_at_a_time)
        self.cond = threading.Condition()
        self.waiting: collections.deque[Any] = collections.deque()
        self.prefilling: list[Any] = []
        self.running: list[Any] = []

    # -- queue -----------------------------------------------------------------------------

    def enqueue(self, entries: Sequence[Any]) -> None:
        """Queue ``entries`` (each a request or a group leader) and wake the engine.

        Raises:
            OverloadedError: the queue cannot take them all.
        """
        with self.cond:
            if len(self.waiting) + len(entries) > self.max_queue:
                raise OverloadedError(
                    f"The server is busy: {len(self.waiting)} requests are already waiting "
                    f"(--max-queue {self.max_queue}). Retry shortly.",
                    retry_after=1.0,
                )
            self.waiting.extend(entries)
            self.cond.notify_all()

    def has_work(self) -> bool:
        """Whether a step has anything to do. Caller holds :attr:`cond`."""
        return bool(self.waiting or self.prefilling or self.running)

    def slots_used(self) -> int:
        """Batch rows taken by running and prefilling requests (groups count each choice)."""
        return len(self.running) + sum(row.width for row in self.prefilling)

    # -- plans -----------------------------------------------------------------------------

    def plan_prefill(self) -> StepPlan:
        """Prefill forwards of their own (nothing runs, or mixed steps are off): take waiting
        prompts whole, packed up to ``max_prefill_tokens`` and the free slots (one request in
        ``one_at_a_time`` mode; a longer prompt alone)."""
        with self.cond:
            plan = StepPlan()
            limit = 1 if self.one_at_a_time else self.max_batch_size - self.slots_used()
            width = tokens = 0
            while self.waiting and width + self.waiting[0].width <= limit:
                size = self.waiting[0].prefill_total
                if plan.admitted and tokens + size > self.max_prefill_tokens:
                    break
                row = self.waiting.popleft()
                plan.admitted.append(row)
                plan.chunks.append(Chunk(row, 0, size))
                width, tokens = width + row.width, tokens + size
            self.prefilling.extend(plan.admitted)
            return plan

    def plan_step(self) -> StepPlan:
        """Rows run (or a prompt is part-way through its chunks): the prompt chunks that fit in
        this step beside them (see the module doc); with no row running, a prompt in progress
        goes on with up to ``max_prefill_tokens``."""
        with self.cond:
            plan = StepPlan()
            budget = self.max_step_tokens - len(self.running) if self.running else self.max_prefill_tokens
            for row in self.prefilling:
                if budget <= 0 and plan.chunks:
                    break
                size = max(1, budget) if row.chunkable else row.prefill_total - row.prefilled
                chunk = Chunk(row, row.prefilled, min(row.prefill_total, row.prefilled + size))
                plan.chunks.append(chunk)
                budget -= chunk.size
            free = self.max_batch_size - self.slots_used()
            while self.waiting and self.waiting[0].width <= free and (budget > 0 or not plan.chunks):
                row = self.waiting[0]
                if row.chunkable:
                    stop = min(row.prefill_total, max(1, budget))
                elif plan.chunks and row.prefill_total > budget:
                    break  # taken whole, alone, at a later step
                else:
                    stop = row.prefill_total
                self.waiting.popleft()
                plan.admitted.append(row)
                plan.chunks.append(Chunk(row, 0, stop))
                self.prefilling.append(row)
                free -= row.width
                budget -= stop
                if self.one_at_a_time:
                    break
            return plan

    # -- changes ---------------------------------------------------------------------------

    def prefill_done(self, rows: Sequence[Any], members: Sequence[Any]) -> None:
        """``rows`` left the prefill (finished it, failed or were cancelled); ``members`` (their
        choices still alive) join the running rows, in order."""
        with self.cond:
            gone = {id(row) for row in rows}
            self.prefilling = [row for row in self.prefilling if id(row) not in gone]
            self.running.extend(members)

    def remove_running(self, indices: Sequence[int]) -> None:
        """Drop the running rows at ``indices`` (they finished)."""
        if not indices:
            return
        gone = set(indices)
        with self.cond:
            self.running = [row for i, row in enumerate(self.running) if i not in gone]

    def take_cancelled(self) -> tuple[list[int], list[Any], list[Any]]:
        """Cancelled requests: (indices of running rows, prefilling rows, waiting rows); the
        prefilling and waiting ones are removed here, the running ones by :meth:`remove_running`."""
        with self.cond:
            running = [i for i, row in enumerate(self.running) if row.cancelled]
            prefilling = [row for row in self.prefilling if row.cancelled]
            waiting = [row for row in self.waiting if row.cancelled]
            for row in waiting:
                self.waiting.remove(row)
            self.prefilling = [row for row in self.prefilling if not row.cancelled]
        return running, prefilling, waiting

    def drain(self) -> list[Any]:
        """Remove and return every request (running, prefilling, waiting)."""
        with self.cond:
            rows = [*self.running, *self.prefilling, *self.waiting]
            self.running, self.prefilling = [], []
            self.waiting.clear()
        return rows

    # -- reports ---------------------------------------------------------------------------

    def in_use(self) -> dict[str, int]:
        """Adapter -> number of waiting, prefilling and running requests that use it."""
        counts: dict[str, int] = collections.Counter()
        with self.cond:
            rows = [*self.waiting, *self.prefilling, *self.running]
        for row in rows:
            for name in row.adapters():
                counts[name] += 1
        return dict(counts)

    def adapters_by_state(self) -> tuple[list[str], list[str]]:
        """(adapters of running and prefilling rows, adapters of waiting rows)."""
        with self.cond:
            running = sorted({n for row in [*self.running, *self.prefilling] for n in row.adapters()})
            waiting = sorted({n for row in self.waiting for n in row.adapters()})
        return running, waiting

    def counts(self) -> dict[str, int]:
        """Queued, prefilling and running requests."""
        with self.cond:
            return {"queued": len(self.waiting), "prefilling": len(self.prefilling), "running": len(self.running)}
