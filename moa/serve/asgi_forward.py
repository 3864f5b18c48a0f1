"""One HTTP request carried to an ASGI app in another process, and its response streamed back.

The Ray backend (:mod:`moa.serve.ray_app`) answers each request with ``moa serve``'s own app
(:func:`moa.serve.app.create_app`) inside the engine replica that holds the request's
adapters; the ingress in front only picks that replica. So the request travels as a
:class:`ForwardedRequest` (plain data, picklable), and :func:`call_app` runs it through the
app in the replica's event loop, yielding the response as it is sent: first a
:class:`ResponseStart` (status and headers), then the body's chunks as they come (a
``stream=true`` completion's server-sent events one by one, so streaming is preserved end to
end).

If the caller stops iterating (the client went away), the app sees ``http.disconnect`` as it
would from uvicorn, so the engine cancels the request's row; an app still running after
:data:`DISCONNECT_GRACE` seconds is cancelled.

Example::

    request = ForwardedRequest("POST", "/v1/completions", b"", [("content-type", "application/json")], body)
    async for part in call_app(app, request):
        ...  # ResponseStart, then bytes
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds an app may take to wind down after the client went away before it is cancelled.
DISCONNECT_GRACE = 5.0
#: Hop-by-hop and length headers, which describe one connection and not the message; the
#: process that writes the message again sets its own.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                         "transfer-encoding", "upgrade", "content-length", "host"})


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as plain data.

    Attributes:
        method: ``GET``, ``POST``...
        path: The URL path (``/v1/completions``).
        query: The raw query string (bytes, without ``?``).
        headers: ``(name, value)`` pairs, names lower-case; hop-by-hop ones are dropped.
        body: The whole body.
        client: ``(host, port)`` of the original client, for the app's logs.
    """

    method: str
    path: str
    query: bytes
    headers: list[tuple[str, str]]
    body: bytes = b""
    client: tuple[str, int] | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)

    @classmethod
    def build(cls, method: str, path: str, query: bytes, headers: Iterable[tuple[str, str]], body: bytes,
              client: tuple[str, int] | None = None) -> ForwardedRequest:
        """A request with its headers lower-cased and the hop-by-hop ones dropped."""
        kept = [(name.lower(), value) for name, value in headers if name.lower() not in HOP_HEADERS]
        return cls(method.upper(), path, query, kept, body, client)


@dataclass
class ResponseStart:
    """The status and headers of a response (the first part :func:`call_app` yields).

    Attributes:
        status: HTTP status.
        headers: ``(name, value)`` pairs as the app sent them (hop-by-hop ones dropped).
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or ``None``."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)


async def call_app(app: Any, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``request`` through the ASGI ``app``; yield its :class:`ResponseStart`, then body chunks.

    Raises:
        RuntimeError: the app ended without starting a response.
        Exception: whatever the app raised before starting its response (after, the
            response is cut short, as a server would).
    """
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if gone.is_set():
            raise OSError("The client went away.")  # as a server's send does; the app stops
        await sent.put(message)

    async def run() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run(), name=f"moa-forward {request.method} {request.path}")
    started = False
    try:
        while True:
            message = await sent.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ResponseStart(int(message["status"]), _decode_headers(message.get("headers") or ()))
            elif message["type"] == "http.response.body":
                chunk = bytes(message.get("body", b""))
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    break
        if not started:
            await task  # raises the app's error, if any
            raise RuntimeError(f"The app ended without answering {request.method} {request.path}.")
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), DISCONNECT_GRACE)
            if not task.done():
                task.cancel()
        elif not task.cancelled() and task.exception() is not None and started:
            logger.warning("The app failed after starting its answer to %s %s: %r", request.method, request.path,
                           task.exception())


def _scope(request: ForwardedRequest) -> dict[str, Any]:
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers]
    headers.append((b"content-length", str(len(request.body)).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("utf-8"),
        "query_string": request.query,
        "root_path": "",
        "headers": headers,
        "client": request.client,
        "server": None,
        "state": {},
    }


def _decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    decoded = [(bytes(k).decode("latin-1"), bytes(v).decode("latin-1")) for k, v in raw]
    return [(k, v) for k, v in decoded if k.lower() not in HOP_HEADERS]
