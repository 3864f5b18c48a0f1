"""Calls the app runs on the engine thread between two steps (adapter load / unload / evict).

No forward may see the adapters change under it, so every change to the served model runs on
the engine thread, between two steps. A call waits at most its timeout to get there (a busy
engine cannot hold an admin request forever): if it has not started by then it is withdrawn,
so it never runs late, behind the caller's back. Calls still queued when the engine stops fail
instead of waiting forever, and none is accepted once it is stopping.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from moa.serve.requests import EngineDeadError, EngineTimeoutError

T = TypeVar("T")


class AdminCalls:
    """The queue of admin calls of one engine.

    Args:
        cond: The engine's condition variable (queueing a call wakes the engine thread).
    """

    def __init__(self, cond: threading.Condition):
        self._cond = cond
        self._queue: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._closed = False

    def __len__(self) -> int:
        """Calls waiting (caller holds the condition, or accepts a stale count)."""
        return len(self._queue)

    def submit(self, fn: Callable[[], T], timeout: float) -> T:
        """Queue ``fn``, wake the engine and wait for its result (or its exception).

        Raises:
            EngineTimeoutError: it did not start within ``timeout`` seconds (it is withdrawn).
            EngineDeadError: the engine is stopping, or stopped before running it.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise EngineDeadError("The engine is shutting down; adapters can no longer be changed.")
            self._queue.append((fn, future))
            self._cond.notify_all()
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.cancel():  # not started: withdrawn, it will never run
                raise EngineTimeoutError(
                    f"The engine did not get to this adapter change within {timeout:g} s (it is busy); nothing "
                    f"was changed. Retry, or raise the admin timeout.") from None
            return future.result()  # running now: it ends soon, between two steps

    def close(self) -> None:
        """Accept no more calls (the engine is stopping). Caller holds the condition."""
        self._closed = True

    def take(self) -> list[tuple[Callable[[], Any], concurrent.futures.Future]]:
        """Every queued call, removed from the queue. Caller holds the condition."""
        calls = list(self._queue)
        self._queue.clear()
        return calls

    @staticmethod
    def run(calls: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
        """Run ``calls`` here (the engine thread), handing each result or error to its caller;
        withdrawn ones are skipped."""
        for fn, future in calls:
            if not future.set_running_or_notify_cancel():  # withdrawn by its caller (timed out)
                continue
            try:
                future.set_result(fn())
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                future.set_exception(error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every queued call with ``error`` and accept no more."""
        with self._cond:
            self._closed = True
            calls = self.take()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
