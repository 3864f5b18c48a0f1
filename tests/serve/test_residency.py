"""Residency keys (what a replica must hold for a request) and the in-process ASGI forwarding
of the Ray backend: no Ray needed."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("fastapi")

from fastapi import FastAPI, Request  # noqa: E402  (module level: the routes' annotations are strings)
from fastapi.responses import StreamingResponse  # noqa: E402

from moa.serve.asgi_forward import ForwardedRequest, ResponseStart, call_app
from moa.serve.residency import key_adapters, residency_key, router_id

SERVED = "tiny-base"


@pytest.mark.parametrize(("body", "key"), [
    ({"model": "sql"}, "sql"),
    ({"model": f"{SERVED}:sql"}, "sql"),
    ({"model": SERVED}, ""),
    ({"model": SERVED, "adapter_weights": {"sql": 0.7, "code": 0.3}}, "code+sql"),
    ({"model": SERVED, "adapter_weights": {"code": 0.3, "sql": 0.7}}, "code+sql"),  # order-free
    ({"model": SERVED, "adapter_weights": {"code": 2.0, "sql": 0.1}}, "code+sql"),  # weights do not matter
    ({"model": SERVED, "adapter_weights": {"sql": 1.0, "code": 0}}, "sql"),  # zero weights need nothing
    ({"model": "auto", "adapter_weights": {"icd": 1.0}}, "icd"),  # adapter_weights override the model
    ({"model": SERVED, "adapter_weights": {}}, ""),
    ({"model": "auto"}, "auto@r1"),
    ({"model": "other-base:sql"}, ""),
    ({"model": "bad name"}, ""),
    ({"model": "a+b"}, ""),
    ({"model": 3}, ""),
    ({"model": SERVED, "adapter_weights": {"sql": "x"}}, ""),
    ({"model": SERVED, "adapter_weights": {"sql": True}}, ""),
    ({"model": SERVED, "adapter_weights": ["sql"]}, ""),
    (["not", "a", "mapping"], ""),
])
def test_residency_key(body, key):
    assert residency_key(body, served_model_name=SERVED, router_id="r1") == key


def test_auto_without_a_router_has_no_key():
    assert residency_key({"model": "auto"}, served_model_name=SERVED, router_id=None) == ""


def test_key_adapters_reads_a_key_back():
    assert key_adapters("code+sql") == ("code", "sql")
    assert key_adapters("sql") == ("sql",)
    assert key_adapters("auto@abc") == () and key_adapters("") == ()


def test_router_id_follows_the_files(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "router_config.json").write_text('{"router": "learned_gate"}')
    assert router_id(first) == router_id(second) and len(router_id(first)) == 12
    (second / "router.safetensors").write_bytes(b"\0" * 8)
    assert router_id(first) != router_id(second)
    assert router_id(None) is None


# -- forwarding a request through an ASGI app ------------------------------------------------


def _app() -> FastAPI:
    app = FastAPI()
    app.state.stopped = asyncio.Event()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"body": (await request.body()).decode(), "auth": request.headers.get("authorization"),
                "query": request.url.query}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def events():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.001)
            finally:
                app.state.stopped.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    return app


def _collect(app, request: ForwardedRequest, limit: int | None = None) -> tuple[ResponseStart, list[bytes]]:
    async def run():
        parts = call_app(app, request)
        start = await parts.__anext__()
        chunks = []
        async for chunk in parts:
            chunks.append(chunk)
            if limit is not None and len(chunks) >= limit:
                break
        await parts.aclose()
        return start, chunks

    return asyncio.run(run())


def test_forwarded_request_keeps_body_headers_and_query():
    request = ForwardedRequest.build("post", "/echo", b"a=1", [("Authorization", "Bearer k"), ("Host", "x"),
                                                               ("Content-Length", "999")], b'{"x": 1}')
    assert request.method == "POST" and request.header("authorization") == "Bearer k"
    assert request.header("host") is None and request.header("content-length") is None
    start, chunks = _collect(_app(), request)
    assert start.status == 200 and start.header("content-type") == "application/json"
    assert start.header("content-length") is None  # the writer sets its own
    assert json.loads(b"".join(chunks)) == {"body": '{"x": 1}', "auth": "Bearer k", "query": "a=1"}


def test_a_stream_arrives_in_parts_and_stops_when_the_reader_leaves():
    app = _app()

    async def run():
        parts = call_app(app, ForwardedRequest.build("GET", "/stream", b"", [], b""))
        start = await parts.__anext__()
        first = [await parts.__anext__() for _ in range(3)]
        await parts.aclose()  # the client went away
        await asyncio.wait_for(app.state.stopped.wait(), 5)
        return start, first

    start, first = asyncio.run(run())
    assert start.header("content-type").startswith("text/event-stream")
    assert first == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]


def test_an_app_error_is_its_500_answer():
    start, chunks = _collect(_app(), ForwardedRequest.build("GET", "/boom", b"", [], b""))
    assert start.status == 500 and b"Internal Server Error" in b"".join(chunks)
