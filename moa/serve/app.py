"""The HTTP app of ``moa serve``: OpenAI's API over the engine, plus vLLM's adapter endpoints.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``),
``GET /v1/models``, ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``,
``GET /health``, ``GET /metrics``. Every answer that is not a success has OpenAI's error
shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad body (never 422),
401 without the API key, 404 for an unknown model (listing the choices), 409 for an adapter
in use, 413 beyond ``max_request_bytes``, 429 with ``Retry-After`` when the queue is full,
503 when the engine is dead.

The app never runs the model itself: requests go to the engine (``submit``), adapter
changes through the cache (which runs them on the engine thread). It only tokenizes, and
that runs on a few worker threads of its own (:data:`TOKENIZER_THREADS`), never on the
event loop: a body of up to ``max_request_bytes`` (1 MiB by default) takes a tokenizer
and a chat template long enough to stall every other connection (``/health`` included).

Example::

    engine = Engine(model); engine.start()
    cache = AdapterCache(engine, model, max_loras=8, allow_runtime_loading=False, pinned=set())
    app = create_app(engine, model, cache, served_model_name="smollm2")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from moa.errors import MoaError, UnknownAdapterError
from moa.model.adapter_bank import check_adapter_name
from moa.serve import protocol
from moa.serve.delivery import Delivery, Presentation
from moa.serve.logprobs import TokenText
from moa.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics
from moa.serve.model_names import ModelNames
from moa.serve.prompts import chat_prompt_ids, completion_prompt_ids, prompt_text
from moa.serve.requests import (
    AUTO,
    BadRequestError,
    GenerationRequest,
    OverloadedError,
    ServeError,
    UnknownModelError,
)
from moa.serve.rows import eos_ids
from moa.serve.structured import StructuredOutput

logger = logging.getLogger(__name__)

#: Default cap on a request body (1 MiB): prompts beyond it are refused with 413.
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
#: Worker threads that tokenize prompts and apply chat templates (per app). Bounded: more
#: would only contend for the CPU with the engine thread.
TOKENIZER_THREADS = 4
#: Name prefix of those threads.
TOKENIZER_THREAD_PREFIX = "moa-tokenize"

_T = TypeVar("_T")


class UnauthorizedError(ServeError):
    """A ``/v1`` request without the server's API key."""

    status = 401
    code = "invalid_api_key"


class PayloadTooLargeError(ServeError):
    """A request body beyond ``max_request_bytes``."""

    status = 413
    code = "request_too_large"


class RuntimeLoadingDisabledError(ServeError):
    """``/v1/load_lora_adapter`` on a server started without ``--allow-runtime-loading`` (vLLM: 404)."""

    status = 404
    code = "not_found"


# -- request size ----------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: answer 413 to a body beyond ``max_bytes`` (declared or streamed).

    The body is read up front (bodies here are JSON, small) and replayed to the app; later
    ``receive`` calls go to the server, so disconnects are still seen.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(send, size)
                return
        await self.app(scope, _replay([b"".join(chunks)], None, receive), send)

    async def _refuse(self, send: Any, size: int) -> None:
        error = PayloadTooLargeError(
            f"The request body ({size} bytes or more) exceeds this server's limit of {self.max_bytes} bytes. "
            f"Send a shorter prompt, or restart the server with a larger --max-request-bytes."
        )
        body = json.dumps(protocol.error_body(str(error), error.status, code=error.code)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _replay(chunks: list[bytes], pending: dict | None, receive: Any) -> Any:
    """A ``receive`` that gives the buffered body (or message) first, then the server's."""
    queue: list[dict] = [{"type": "http.request", "body": c, "more_body": False} for c in chunks]
    if pending is not None:
        queue.append(pending)

    async def replayed() -> dict:
        if queue:
            return queue.pop(0)
        return await receive()

    return replayed


async def _wait_disconnect(request: Request) -> None:
    """Return once the client has closed the connection."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- the app -------------------------------------------------------------------------------


def create_app(
    engine: Any,
    model: Any,
    adapter_cache: Any,
    *,
    served_model_name: str,
    api_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allow_runtime_loading: bool = False,
    metrics: ServeMetrics | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model`` through ``engine``.

    Args:
        engine: A started :class:`~moa.serve.engine.Engine` over ``model``.
        model: The served :class:`~moa.MixtureModel` (tokenizer, router; never run here).
        adapter_cache: The :class:`~moa.serve.adapter_cache.AdapterCache` of ``model``.
        served_model_name: The base's name in the API (``"model"`` field, ``/v1/models``).
        api_key: When set, every ``/v1`` route needs ``Authorization: Bearer <api_key>``.
        max_request_bytes: Larger request bodies get 413.
        allow_runtime_loading: Enable ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.
        metrics: The metrics to update (default: a new :class:`ServeMetrics`).
    """
    if served_model_name == AUTO or served_model_name in adapter_cache.registered():
        raise BadRequestError(
            f"served_model_name {served_model_name!r} clashes with "
            f"{'the router' if served_model_name == AUTO else 'an adapter'} of that name; pick another "
            f"--served-model-name."
        )
    metrics = metrics or ServeMetrics(max_loras=adapter_cache.max_loras)
    names = ModelNames(served_model_name, model, adapter_cache)
    tokenizing = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix=TOKENIZER_THREAD_PREFIX)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        tokenizing.shutdown(wait=False, cancel_futures=True)

    async def off_loop(function: Callable[..., _T], *args: Any) -> _T:
        """``function(*args)`` on a tokenizer thread (the event loop serves others meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(tokenizing, functools.partial(function, *args))

    app = FastAPI(title="moa serve", version=_package_version(), docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.model, app.state.adapter_cache = engine, model, adapter_cache
    app.state.metrics, app.state.names = metrics, names
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    _add_error_handlers(app, metrics)

    async def require_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise UnauthorizedError(
                "Missing or incorrect API key. Send the header 'Authorization: Bearer <key>' with the key "
                "the server was started with (--api-key)."
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    tokens = TokenText(getattr(model, "tokenizer", None))
    structured = StructuredOutput(getattr(model, "tokenizer", None), int(model.config.vocab_size), eos_ids(model))

    async def submit(request: Request, body: protocol.SamplingFields, kind: str, prompts: list[list[int]],
                     texts: list[str] | None = None) -> Response:
        arrived = time.perf_counter()
        resolved = names.resolve(body.model, body.adapter_weights)
        params = body.sampling_params()
        for prompt_ids in prompts:
            protocol.check_prompt_not_empty(prompt_ids)
        if len(prompts) > engine.max_queue:
            raise BadRequestError(f"prompt holds {len(prompts)} prompts; this server queues at most "
                                  f"{engine.max_queue} requests (--max-queue). Send fewer per request.", "prompt")
        spec = body.response_spec()
        grammar = await run_in_threadpool(structured.grammar, spec) if spec else None
        n = body.n
        choices = [[params.for_choice(j) for j in range(n)] for _ in prompts]
        guides = await run_in_threadpool(lambda: [[structured.guide(grammar) if grammar else None for _ in row]
                                                  for row in choices])
        request_id = protocol.new_request_id("chatcmpl" if kind == "chat" else "cmpl")
        handles: list[Any] = []
        with adapter_cache.lease(resolved.adapters):
            if any(adapter_cache.record(name) is None for name in resolved.adapters):
                await run_in_threadpool(adapter_cache.ensure, resolved.adapters)
            else:
                adapter_cache.touch(resolved.adapters)
            try:
                for i, prompt_ids in enumerate(prompts):
                    group = [GenerationRequest(request_id if i * n + j == 0 else f"{request_id}-{i * n + j}",
                                               prompt_ids, resolved.routing, p, guide=g)
                             for j, (p, g) in enumerate(zip(choices[i], guides[i], strict=True))]
                    handles.extend(engine.submit_choices(group))
            except BaseException:
                for handle in handles:
                    handle.cancel()
                raise
        show = Presentation(kind, n, prompts, texts or [], echo=bool(getattr(body, "echo", False)),
                            logprobs=params.logprobs is not None, prompt_logprobs=params.prompt_logprobs is not None,
                            as_ids=body.return_tokens_as_token_ids, tokens=tokens)
        delivery = Delivery(handles, request_id, body.model, resolved.label, arrived, body.include_usage, metrics,
                            show)
        if body.stream:
            return StreamingResponse(delivery.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await delivery.collect(lambda: _wait_disconnect(request)))

    @v1.post("/completions")
    async def completions(request: Request, body: protocol.CompletionRequest) -> Response:
        """OpenAI's text completions (``prompt``: one or several), streamed or not."""
        given = body.prompts()

        def encode() -> tuple[list[list[int]], list[str] | None]:
            prompts = [completion_prompt_ids(model, p.text, p.token_ids) for p in given]
            texts = [p.text if p.text is not None else prompt_text(model, ids) for p, ids in
                     zip(given, prompts, strict=True)] if body.echo else None
            return prompts, texts

        prompts, texts = await off_loop(encode)
        return await submit(request, body, "completion", prompts, texts)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request, body: protocol.ChatCompletionRequest) -> Response:
        """OpenAI's chat completions (``messages``, the base's chat template), streamed or not."""
        prompt_ids = await off_loop(chat_prompt_ids, model, body.message_dicts())
        return await submit(request, body, "chat", [prompt_ids])

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        """The base, ``auto`` (with a router) and every adapter (``parent`` = the base)."""
        return {"object": "list", "data": names.cards()}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        """One entry of ``/v1/models``."""
        for card in names.cards():
            if card["id"] == model_id:
                return card
        raise UnknownModelError(f"The model {model_id!r} does not exist. Choices: {', '.join(names.choices())}.")

    def check_runtime_loading() -> None:
        if not allow_runtime_loading:
            raise RuntimeLoadingDisabledError(
                "Loading and unloading adapters at run time is not enabled on this server. Restart it "
                "with --allow-runtime-loading (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING)."
            )

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: protocol.LoadAdapterRequest) -> dict[str, Any]:
        """Load (or replace) an adapter from a folder, Hub id (``@revision``) or registry name."""
        check_runtime_loading()
        check_adapter_name(body.lora_name)  # a bad name is refused before any file or Hub access
        if body.lora_name in (served_model_name, AUTO):
            raise BadRequestError(f"lora_name {body.lora_name!r} is reserved (the base or the router); "
                                  f"pick another name.")
        evicted_before = adapter_cache.evictions
        record = await run_in_threadpool(adapter_cache.load, body.lora_name, body.lora_path)
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                "lora_name": record.name, "source": record.source, "load_seconds": record.load_seconds,
                "evicted": adapter_cache.evictions - evicted_before}

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: protocol.UnloadAdapterRequest) -> dict[str, Any]:
        """Unload an adapter (409 while requests use it)."""
        check_runtime_loading()
        await run_in_threadpool(adapter_cache.unload, body.lora_name)
        return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                "lora_name": body.lora_name}

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine runs, 503 once it died or was shut down."""
        if engine.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "detail": "the engine loop is not running"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text exposition (this server's own registry)."""
        metrics.refresh(engine, adapter_cache)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    """Every error answer in OpenAI's shape."""

    def answer(status: int, message: str, code: str | None, param: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.observe_error(status)
        return JSONResponse(protocol.error_body(message, status, code=code, param=param), status_code=status,
                            headers=headers)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        headers = None
        if isinstance(error, OverloadedError):
            headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
        elif isinstance(error, UnauthorizedError):
            headers = {"WWW-Authenticate": "Bearer"}
        return answer(error.status, str(error), error.code, getattr(error, "param", None), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = protocol.validation_message(list(error.errors()))
        return answer(400, message, "invalid_request_error", param)

    @app.exception_handler(ValidationError)
    async def invalid_value(request: Request, error: ValidationError) -> JSONResponse:
        message, param = protocol.validation_message(list(error.errors()))
        return answer(400, message, "invalid_request_error", param)

    @app.exception_handler(MoaError)
    async def moa_error(request: Request, error: MoaError) -> JSONResponse:
        status = 404 if isinstance(error, UnknownAdapterError) else 400
        return answer(status, str(error), type(error).__name__)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return answer(error.status_code, str(error.detail), None, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("Unexpected error serving %s %s", request.method, request.url.path)
        return answer(500, f"Internal server error: {type(error).__name__}: {error}. See the server's log.",
                      "internal_error")


def _package_version() -> str:
    from moa import __version__

    return __version__
