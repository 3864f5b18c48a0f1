"""Deliver one HTTP request's choices to its client: a JSON body, or Server-Sent Events.

A request holds one engine request per choice (``n`` per prompt, several prompts on
``/v1/completions``); choice ``index = i * n + j`` is prompt ``i``'s choice ``j``. Both paths
watch the client: when it goes away (a closed connection while waiting for a non-streamed
answer; a cancelled stream), every choice's handle is cancelled, so their rows leave the
batch at the next engine step instead of generating for nobody. Every choice that ends
(cancelled ones too) is counted in the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from moa.serve import responses
from moa.serve.logprobs import TokenText, chat_logprobs, completion_logprobs
from moa.serve.metrics import ServeMetrics
from moa.serve.requests import Completion, ServeError, TokenEvent

logger = logging.getLogger(__name__)

#: Seconds to wait for a cancelled request's final record (for the metrics) before giving up.
_CANCELLED_RECORD_TIMEOUT = 30.0


@dataclass(frozen=True)
class Presentation:
    """How an answer shows its choices.

    Attributes:
        kind: ``"completion"`` or ``"chat"``.
        n: Choices per prompt.
        prompt_ids: Each prompt's token ids.
        prompt_texts: Each prompt's text (shown first with ``echo``).
        echo: Prepend the prompt to each choice's text (``/v1/completions``).
        logprobs: Show the generated tokens' log-probabilities.
        prompt_logprobs: Show the prompt's too (``echo`` with ``logprobs``).
        as_ids: Name tokens ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids``).
        tokens: Token texts.
    """

    kind: str
    n: int = 1
    prompt_ids: Sequence[Sequence[int]] = ()
    prompt_texts: Sequence[str] = ()
    echo: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False
    as_ids: bool = False
    tokens: TokenText | None = None

    def prompt_of(self, index: int) -> int:
        """The prompt a choice answers."""
        return index // self.n

    def text(self, index: int, completion: Completion) -> str:
        """A choice's whole text (the prompt first with ``echo``)."""
        return (self.prompt_texts[self.prompt_of(index)] if self.echo else "") + completion.text

    def completion_logprobs(self, index: int, completion: Completion) -> dict[str, Any] | None:
        """A non-streamed choice's ``logprobs``."""
        if not self.logprobs:
            return None
        entries: list[Any] = []
        if self.prompt_logprobs and completion.prompt_logprobs is not None:
            entries.extend(completion.prompt_logprobs)
        entries.extend(completion.logprobs or ())
        if self.kind == "chat":
            return chat_logprobs(entries, self.tokens, as_ids=self.as_ids)
        return completion_logprobs(entries, self.tokens, as_ids=self.as_ids,
                                   first_token=self.prompt_ids[self.prompt_of(index)][0])

    def choice(self, index: int, completion: Completion) -> dict[str, Any]:
        """A non-streamed answer's ``choices`` entry."""
        logprobs = self.completion_logprobs(index, completion)
        if self.kind == "chat":
            return responses.chat_choice(index, completion.text, completion.finish_reason, logprobs)
        return responses.completion_choice(index, self.text(index, completion), completion.finish_reason, logprobs)


def usage_of(completions: Sequence[Completion], n: int) -> dict[str, int]:
    """OpenAI's usage of a request: each prompt counted once (its ``n`` choices share it), every
    choice's tokens."""
    prompt = sum(c.prompt_tokens for i, c in enumerate(completions) if i % n == 0)
    return responses.usage(prompt, sum(c.completion_tokens for c in completions))


@dataclass
class Delivery:
    """One submitted request's choices and what its answer needs.

    Attributes:
        handles: The engine's :class:`RequestHandle` of each choice, by index.
        request_id: ``cmpl-...`` / ``chatcmpl-...``.
        model: The ``model`` the client asked for (echoed in the answer).
        label: The metrics label of the model.
        arrived: ``time.perf_counter()`` when the request arrived.
        include_usage: End a stream with a usage chunk.
        metrics: Where to count it.
        show: How the choices are shown.
    """

    handles: Sequence[Any]
    request_id: str
    model: str
    label: str
    arrived: float
    include_usage: bool
    metrics: ServeMetrics
    show: Presentation
    created: int = 0
    first_token_at: float | None = None
    _offsets: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.created = int(time.time())

    @property
    def kind(self) -> str:
        return self.show.kind

    def _record(self, completion: Completion) -> None:
        now = time.perf_counter()
        first = None if self.first_token_at is None else self.first_token_at - self.arrived
        self.metrics.observe_completion(self.label, completion, seconds_total=now - self.arrived,
                                        seconds_to_first_token=first)

    def _cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def _body(self, completions: Sequence[Completion]) -> dict[str, Any]:
        choices = [self.show.choice(i, c) for i, c in enumerate(completions)]
        if len(choices) > 1:
            for choice, completion in zip(choices, completions, strict=True):
                choice["moa"] = responses.moa_extension(completion.routing)
        return responses.response(self.request_id, self.kind, self.model, choices,
                                  usage_of(completions, self.show.n), completions[0].routing, created=self.created)

    # -- non-streamed ----------------------------------------------------------------------

    async def collect(self, disconnected: Callable[[], Any]) -> dict[str, Any]:
        """Wait for every choice and return the response body; cancel if the client leaves first.

        Args:
            disconnected: An awaitable factory that returns when the client has gone away.
        """
        async def consume(handle: Any) -> Completion:
            async for _ in handle.events():
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
            return await final_completion(handle)

        answer = asyncio.ensure_future(asyncio.gather(*(consume(h) for h in self.handles)))
        watcher = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done():
                logger.info("Client of %s went away; cancelling it.", self.request_id)
                self._cancel()
            completions = await answer
        except BaseException:
            self._cancel()
            answer.cancel()
            raise
        finally:
            watcher.cancel()
        for completion in completions:
            self._record(completion)
        return self._body(completions)

    # -- streamed --------------------------------------------------------------------------

    def _chunk(self, index: int, text: str, finish_reason: str | None = None, entries: Sequence[Any] = (),
               completion: Completion | None = None, first_token: int | None = None) -> dict:
        routing = completion.routing if completion is not None else None
        show = self.show
        if self.kind == "chat":
            delta = {"content": text} if text or finish_reason is None else {}
            logprobs = chat_logprobs(entries, show.tokens, as_ids=show.as_ids) if entries else None
            return responses.chat_chunk(self.request_id, self.model, self.created, delta, index=index,
                                        finish_reason=finish_reason, logprobs=logprobs, routing=routing)
        logprobs = None
        if entries:
            offset = self._offsets.get(index, 0)
            logprobs = completion_logprobs(entries, show.tokens, as_ids=show.as_ids, offset=offset,
                                           first_token=first_token)
            self._offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
        return responses.completion_chunk(self.request_id, self.model, self.created, text, index=index,
                                          finish_reason=finish_reason, logprobs=logprobs, routing=routing)

    def _event_chunks(self, index: int, event: TokenEvent, started: set[int]) -> list[dict]:
        """The chunks one token event makes (the echoed prompt first, on a choice's first event)."""
        show = self.show
        chunks = []
        if index not in started:
            started.add(index)
            prompt = show.prompt_of(index)
            if show.echo:
                entries = (event.prompt_logprobs or []) if show.prompt_logprobs else []
                chunks.append(self._chunk(index, show.prompt_texts[prompt], entries=entries,
                                          first_token=show.prompt_ids[prompt][0]))
        entries = [event.logprob] if show.logprobs and event.logprob is not None else []
        if event.text or entries:
            chunks.append(self._chunk(index, event.text, entries=entries))
        return chunks

    async def stream(self) -> AsyncIterator[str]:
        """The SSE body: ``data: {chunk}\\n\\n`` per token and choice, each choice's last chunk,
        ``data: [DONE]``.

        A chat stream starts each choice with the assistant role. A choice's last chunk carries
        its finish reason and ``"moa": {"routing": ...}``; ``include_usage`` adds a usage chunk.
        An engine error mid-stream is sent as ``data: {"error": ...}``. If the stream is cut
        (client gone: the server cancels this generator), every choice is cancelled.
        """
        finished = False
        completions: dict[int, Completion] = {}
        started: set[int] = set()
        try:
            if self.kind == "chat":
                for index in range(len(self.handles)):
                    yield sse(responses.chat_chunk(self.request_id, self.model, self.created,
                                                   {"role": "assistant", "content": ""}, index=index))
            try:
                async for index, item in merged(self.handles):
                    if isinstance(item, Completion):
                        completions[index] = item
                        self._record(item)
                        yield sse(self._chunk(index, "", item.finish_reason, completion=item))
                        continue
                    if self.first_token_at is None:
                        self.first_token_at = time.perf_counter()
                    for chunk in self._event_chunks(index, item, started):
                        yield sse(chunk)
            except ServeError as error:
                finished = True
                self._cancel()
                self.metrics.observe_error(error.status)
                yield sse(responses.error_body(str(error), error.status, code=error.code,
                                               param=getattr(error, "param", None)))
                yield "data: [DONE]\n\n"
                return
            finished = True
            if self.include_usage:
                obj = responses.CHAT_CHUNK_OBJECT if self.kind == "chat" else responses.COMPLETION_OBJECT
                ordered = [completions[i] for i in range(len(self.handles))]
                yield sse(responses.usage_chunk(self.request_id, obj, self.model, self.created,
                                                usage_of(ordered, self.show.n)))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                logger.info("Stream of %s was cut; cancelling it.", self.request_id)
                self._cancel()
                with contextlib.suppress(RuntimeError):  # no running loop at interpreter exit
                    loop = asyncio.get_running_loop()
                    for index, handle in enumerate(self.handles):
                        if index not in completions:
                            loop.create_task(self._record_cancelled(handle))

    async def _record_cancelled(self, handle: Any) -> None:
        """Count a cut stream's choice once the engine has dropped its row."""
        try:
            completion = await asyncio.wait_for(handle.result(), _CANCELLED_RECORD_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - metrics only; the client is gone anyway
            logger.debug("No final record for cut stream %s: %s", self.request_id, error)
            return
        self._record(completion)


async def merged(handles: Sequence[Any]) -> AsyncIterator[tuple[int, TokenEvent | Completion]]:
    """Every handle's token events and then its completion, as ``(index, item)``, in arrival order.

    Raises:
        The first error a handle ends with (the other handles are then left to the caller).
    """
    if len(handles) == 1:  # the common case, without tasks
        async for event in handles[0].events():
            yield 0, event
        yield 0, await final_completion(handles[0])
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: Any) -> None:
        try:
            async for event in handle.events():
                queue.put_nowait((index, event))
            queue.put_nowait((index, await final_completion(handle)))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, error))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Completion):
                remaining -= 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()


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
