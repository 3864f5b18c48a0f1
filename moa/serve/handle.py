"""The client side of one engine request: its token events and its completion."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from moa.serve.requests import Completion, GenerationRequest


class RequestHandle:
    """The client side of one request: its token events and its completion.

    Events reach an asyncio consumer through its event loop (captured when the request
    was submitted from a running loop), or a blocking consumer through :meth:`wait`.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None):
        self.request_id = request.request_id
        self._loop = loop
        self._events: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._done = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request at its next step (finish reason "cancelled")."""
        self.cancelled.set()

    # -- engine side -----------------------------------------------------------------------

    def _push(self, item: Any) -> None:
        if self._events is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the client's loop is closed: nobody listens any more
            self.cancelled.set()

    def emit(self, event: Any) -> None:
        """Deliver one :class:`~moa.serve.requests.TokenEvent` (engine thread)."""
        self._push(event)

    def finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        """Deliver the end of the request (engine thread)."""
        self._completion, self._error = completion, error
        self._done.set()
        self._push(error if error is not None else completion)

    # -- client side -----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def events(self) -> AsyncIterator[Any]:
        """Each generated token's event, in order; ends when the request ends."""
        if self._events is None:
            raise RuntimeError("This request was submitted outside an event loop; use wait().")
        while True:
            item = await self._events.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Completion):
                return
            yield item

    async def result(self) -> Completion:
        """Wait for the end (consuming the events) and return the completion."""
        if not self.done:
            async for _ in self.events():
                pass
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion

    def wait(self, timeout: float | None = None) -> Completion:
        """Block until the request ends; return its completion (or raise its error)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"Request {self.request_id} did not finish within {timeout} s.")
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion
