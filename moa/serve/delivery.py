"""Deliver one engine request to its HTTP client: a JSON body, or Server-Sent Events.

Both paths watch the client: when it goes away (a closed connection while waiting for a
non-streamed answer; a cancelled stream), the request's handle is cancelled, so its row
leaves the batch at the next engine step instead of generating for nobody. Every request
that ends (cancelled ones too) is counted in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from moa.serve import protocol
from moa.serve.metrics import ServeMetrics
from moa.serve.requests import Completion, ServeError

logger = logging.getLogger(__name__)

#: Seconds to wait for a cancelled request's final record (for the metrics) before giving up.
_CANCELLED_RECORD_TIMEOUT = 30.0


@dataclass
class Delivery:
    """One submitted request and what its answer needs.

    Attributes:
        handle: The engine's :class:`RequestHandle`.
        kind: ``"completion"`` or ``"chat"``.
        request_id: ``cmpl-...`` / ``chatcmpl-...``.
        model: The ``model`` the client asked for (echoed in the answer).
        label: The metrics label of the model.
        arrived: ``time.perf_counter()`` when the request arrived.
        include_usage: End a stream with a usage chunk.
        metrics: Where to count it.
    """

    handle: Any
    kind: str
    request_id: str
    model: str
    label: str
    arrived: float
    include_usage: bool
    metrics: ServeMetrics
    created: int = 0
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def _record(self, completion: Completion) -> None:
        now = time.perf_counter()
        first = None if self.first_token_at is None else self.first_token_at - self.arrived
        self.metrics.observe_completion(self.label, completion, seconds_total=now - self.arrived,
                                        seconds_to_first_token=first)

    def _body(self, completion: Completion) -> dict[str, Any]:
        build = protocol.chat_response if self.kind == "chat" else protocol.completion_response
        return build(self.request_id, self.model, completion, created=self.created)

    # -- non-streamed ----------------------------------------------------------------------

    async def collect(self, disconnected: Callable[[], Any]) -> dict[str, Any]:
        """Wait for the end and return the response body; cancel if the client leaves first.

        Args:
            disconnected: An awaitable factory that returns when the client has gone away.
        """
        async def consume() -> Completion:
            async for _ in self.handle.events():
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
            return await final_completion(self.handle)

        answer = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                logger.info("Client of %s went away; cancelling it.", self.request_id)
                self.handle.cancel()
            completion = await answer
        except asyncio.CancelledError:
            self.handle.cancel()
            answer.cancel()
            raise
        finally:
            watcher.cancel()
        self._record(completion)
        return self._body(completion)

    # -- streamed --------------------------------------------------------------------------

    def _chunk(self, text: str, finish_reason: str | None = None, completion: Completion | None = None) -> dict:
        if self.kind == "chat":
            delta = {"content": text} if text or finish_reason is None else {}
            return protocol.chat_chunk(self.request_id, self.model, self.created, delta,
                                       finish_reason=finish_reason, completion=completion)
        return protocol.completion_chunk(self.request_id, self.model, self.created, text,
                                         finish_reason=finish_reason, completion=completion)

    async def stream(self) -> AsyncIterator[str]:
        """The SSE body: ``data: {chunk}\\n\\n`` per token, the last chunk, ``data: [DONE]``.

        A chat stream starts with the assistant role. The last chunk carries the finish
        reason and ``"moa": {"routing": ...}``; ``include_usage`` adds a usage chunk. An
        engine error mid-stream is sent as ``data: {"error": ...}``. If the stream is cut
        (client gone: the server cancels this generator), the request is cancelled.
        """
        finished = False
        try:
            if self.kind == "chat":
                yield sse(protocol.chat_chunk(self.request_id, self.model, self.created,
                                              {"role": "assistant", "content": ""}))
            try:
                async for event in self.handle.events():
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                    if event.text:
                        yield sse(self._chunk(event.text))
                completion = await final_completion(self.handle)
            except ServeError as error:
                finished = True
                self.metrics.observe_error(error.status)
                yield sse(protocol.error_body(str(error), error.status, code=error.code))
                yield "data: [DONE]\n\n"
                return
            finished = True
            self._record(completion)
            yield sse(self._chunk("", completion.finish_reason, completion))
            if self.include_usage:
                obj = protocol.CHAT_CHUNK_OBJECT if self.kind == "chat" else protocol.COMPLETION_OBJECT
                yield sse(protocol.usage_chunk(self.request_id, obj, self.model, self.created, completion))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                logger.info("Stream of %s was cut; cancelling it.", self.request_id)
                self.handle.cancel()
                with contextlib.suppress(RuntimeError):  # no running loop at interpreter exit
                    asyncio.get_running_loop().create_task(self._record_cancelled())

    async def _record_cancelled(self) -> None:
        """Count a cut stream once the engine has dropped its row."""
        try:
            completion = await asyncio.wait_for(self.handle.result(), _CANCELLED_RECORD_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - metrics only; the client is gone anyway
            logger.debug("No final record for cut stream %s: %s", self.request_id, error)
            return
        self._record(completion)


async def final_completion(handle: Any) -> Completion:
    """The completion of a handle whose events were consumed (or not): ``wait(0)`` once it
    ended, else ``result()``."""
    try:
        return handle.wait(0)
    except TimeoutError:
        return await handle.result()


def sse(payload: dict[str, Any]) -> str:
    """One Server-Sent Event carrying ``payload`` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"
