"""``moa serve`` on Ray Serve: engine replicas on one machine or a cluster, routed by adapter affinity.

One ``moa serve`` is one engine on one machine. This application runs several, as Ray Serve
replicas, behind one OpenAI-compatible endpoint:

* **the ingress** (``MoaIngress``, a FastAPI app through ``@serve.ingress``) reads each
  request's *residency key* (:func:`moa.serve.residency.residency_key`: a named adapter -> its
  name, a mixture -> its sorted adapter set, ``auto`` -> the router's id) and forwards the
  request, untouched, to an engine replica through a handle *multiplexed on that key*
  (``handle.options(multiplexed_model_id=key)``): Ray routes it to a replica that already
  holds the key, or, when none does (or those that do are at ``max_ongoing_requests``), to the
  one holding the fewest keys;
* **each engine replica** (``MoaEngine``) is a whole ``moa serve``: its model, its engine
  thread (continuous batching as always), its adapter cache, and ``moa serve``'s own app
  (:func:`moa.serve.app.create_app`), which answers the forwarded request
  (:mod:`moa.serve.asgi_forward`) — the same API, errors and streaming as one server. Its
  ``@serve.multiplexed`` loader makes the key's adapters resident (from their folder, the
  registry or the Hub, as ``--allow-runtime-loading`` loads them) and Ray evicts keys LRU past
  ``keys_per_replica``; the adapter cache evicts adapters LRU past ``max_loras``.

Every forwarded answer says where it was served: ``x-moa-replica`` (the replica),
``x-moa-residency-key``, ``x-moa-key-resident`` (``1`` when every adapter of the key was
resident in that replica as the request arrived: an affinity hit, no load) and
``x-moa-adapter-loads`` (adapters that replica has loaded since it started). With
``affinity=False`` the ingress forwards without the key (Ray's plain power-of-two-choices
routing), for comparison.

Launch::

    moa serve --backend ray --replicas 4                       # a local Ray, or RAY_ADDRESS's cluster
    serve run moa.serve.ray_app:build replicas=4 max_loras=8   # Ray's own CLI (and serve.yaml)

Adapters are given when the application is deployed (``lora_modules``); the runtime
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` are refused here (404), since a
call would reach one replica only: redeploy with the adapter in ``lora_modules`` instead.
"""

# No ``from __future__ import annotations`` here: Ray's @serve.ingress rebuilds the route
# methods' signatures, and FastAPI must see real types there (a string would be a query field).
import argparse
import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from moa.serve import protocol
from moa.serve.asgi_forward import ForwardedRequest, ResponseStart, call_app
from moa.serve.ray_options import RayServeOptions, build_replica
from moa.serve.residency import key_adapters, residency_key, router_id

logger = logging.getLogger(__name__)

#: The application's name in Ray Serve.
APP_NAME = "moa"
#: ``max_ongoing_requests`` of an ingress replica: it only awaits the engine replicas.
INGRESS_MAX_ONGOING = 1024
#: Paths whose body carries a residency key.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
#: Runtime adapter changes, refused on this backend (they would reach one replica only).
RUNTIME_LOADING_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
#: The answer headers each engine replica adds (see the module docstring).
REPLICA_HEADER = "x-moa-replica"
KEY_HEADER = "x-moa-residency-key"
RESIDENT_HEADER = "x-moa-key-resident"
LOADS_HEADER = "x-moa-adapter-loads"


# -- the engine replica --------------------------------------------------------------------


@serve.deployment(name="MoaEngine")
class MoaEngine:
    """One engine replica: a whole ``moa serve`` answering the requests forwarded to it.

    Args:
        options: :class:`~moa.serve.ray_options.RayServeOptions`, as a dict.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = RayServeOptions.model_validate(options)
        self.engine, self.model, self.cache, self.app = build_replica(self.options)
        self._loaded_at_start = len(self.cache.resident()) + self.cache.evictions
        self._replica = serve.get_replica_context().replica_tag
        keys = self.options.keys_for(self.cache.max_loras)

        async def hold_key(key: str) -> tuple[str, ...]:
            return await self._hold(key)

        # Multiplexed at run time: keys_per_replica follows this replica's max_loras. Ray keeps
        # what the loader returns per key and evicts keys LRU; the adapters themselves stay
        # until the adapter cache needs their room (another key may share them).
        self._multiplexed_hold = serve.multiplexed(max_num_models_per_replica=keys)(hold_key)
        logger.info("Replica %s holds up to %d residency keys.", self._replica, keys)

    async def _hold(self, key: str) -> tuple[str, ...]:
        """Ray's loader for ``key``: make its adapters resident (off the event loop)."""
        adapters = key_adapters(key)
        if adapters:
            try:
                await asyncio.to_thread(self.cache.ensure, adapters)
            except Exception as error:  # noqa: BLE001 - the app answers the request's error itself
                logger.info("Residency key %r not loaded here (%s); the request gets the server's answer.", key,
                            error)
        return adapters

    def adapter_loads(self) -> int:
        """Adapters this replica has loaded since it started (each load is a new resident or an eviction)."""
        return len(self.cache.resident()) + self.cache.evictions - self._loaded_at_start

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Answer ``request`` with ``moa serve``'s app; yield its start, then its body's chunks."""
        key = request.header(KEY_HEADER) or ""
        resident = all(self.cache.record(name) is not None for name in key_adapters(key))
        if serve.get_multiplexed_model_id():
            await self._multiplexed_hold(key)
        async for part in call_app(self.app, request):
            if isinstance(part, ResponseStart):
                part.headers += [(REPLICA_HEADER, self._replica), (KEY_HEADER, key),
                                 (RESIDENT_HEADER, "1" if resident else "0"),
                                 (LOADS_HEADER, str(self.adapter_loads()))]
            yield part

    def check_health(self) -> None:
        """Ray's health check: a replica whose engine stopped is replaced."""
        if not self.engine.alive:
            raise RuntimeError("The moa engine loop is not running.")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=10.0, cancel=True)


# -- the ingress ---------------------------------------------------------------------------

# The ingress class is serialised when it is decorated, with the module's globals as they are
# then: everything its methods use is defined above it.
async def _relay(parts: Any) -> AsyncIterator[bytes]:
    """The rest of a streamed answer; cancels the replica's side if the client goes away."""
    finished = False
    try:
        async for chunk in parts:
            yield chunk
        finished = True
    finally:
        if not finished:
            parts.cancel()


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, status, code=code), status_code=status)


ingress_api = FastAPI(title="moa serve (Ray)", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="MoaIngress", max_ongoing_requests=INGRESS_MAX_ONGOING)
@serve.ingress(ingress_api)
class MoaIngress:
    """The HTTP entry: reads each request's residency key and forwards it to an engine replica.

    Args:
        engine: The handle of the ``MoaEngine`` deployment.
        options: :class:`~moa.serve.ray_options.RayServeOptions`, as a dict.
    """

    def __init__(self, engine: DeploymentHandle, options: dict[str, Any]) -> None:
        self.options = RayServeOptions.model_validate(options)
        self.engine = engine
        self.served_model_name = self.options.served_name()
        self.router_id = router_id(self.options.modules_and_router()[1])

    def key_of(self, path: str, body: bytes) -> str:
        """The residency key of a request to ``path`` with ``body`` (``""``: none)."""
        if path not in GENERATION_PATHS:
            return ""
        try:
            parsed = json.loads(body)
        except ValueError:
            return ""  # the replica answers 400
        return residency_key(parsed, served_model_name=self.served_model_name, router_id=self.router_id)

    @ingress_api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(self, request: Request, path: str) -> Response:
        """Forward any request to an engine replica (by its residency key) and relay the answer."""
        url_path = request.url.path
        if url_path in RUNTIME_LOADING_PATHS:
            return _error(404, "not_found", "Adapters cannot be loaded or unloaded at run time on the Ray backend (the "
                          "call would reach one replica only). Add the adapter to lora_modules and redeploy "
                          "(serve deploy); replicas load it when a request names it.")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.options.max_request_bytes:
                return _error(413, "request_too_large",
                              f"The request body ({len(body)} bytes or more) exceeds this server's limit of "
                              f"{self.options.max_request_bytes} bytes. Send a shorter prompt, or redeploy with a "
                              f"larger max_request_bytes.")
        key = self.key_of(url_path, bytes(body))
        client = (request.client.host, request.client.port) if request.client else None
        headers = [(name, value) for name, value in request.headers.items() if name.lower() != KEY_HEADER]
        forwarded = ForwardedRequest.build(request.method, url_path, request.scope.get("query_string", b""),
                                           [*headers, (KEY_HEADER, key)], bytes(body), client)
        if key and self.options.affinity:
            handle = self.engine.options(stream=True, multiplexed_model_id=key)
        else:
            handle = self.engine.options(stream=True)
        parts = handle.handle.remote(forwarded)
        try:
            start = await parts.__anext__()
        except Exception as error:  # noqa: BLE001 - the replica died or refused: an OpenAI-shaped 503
            logger.warning("Forwarding %s %s failed: %r", request.method, url_path, error)
            return _error(503, "engine_unavailable", f"No engine replica could answer: {type(error).__name__}: "
                          f"{error}. Retry; see the Ray Serve logs if it persists.")
        if not isinstance(start, ResponseStart):
            parts.cancel()
            return _error(502, "bad_gateway", "The engine replica answered without a response start.")
        answer_headers = dict(start.headers)
        if (start.header("content-type") or "").startswith("text/event-stream"):
            return StreamingResponse(_relay(parts), status_code=start.status, headers=answer_headers)
        content = b"".join([chunk async for chunk in parts])
        return Response(content, status_code=start.status, headers=answer_headers)


# -- building and running ------------------------------------------------------------------


def build_app(options: RayServeOptions) -> Any:
    """The Ray Serve application (ingress bound to the engine deployment) for ``options``."""
    settings = options.model_dump()
    engine = MoaEngine.options(**options.engine_deployment_options()).bind(settings)
    return MoaIngress.options(num_replicas=options.ingress_replicas,
                              ray_actor_options={"num_cpus": options.ingress_cpus}).bind(engine, settings)


def build(args: dict[str, Any]) -> Any:
    """Ray's application builder: ``serve run moa.serve.ray_app:build replicas=2 max_loras=4``
    (or a ``serve.yaml`` naming ``import_path: moa.serve.ray_app:build`` with ``args:``).

    Args:
        args: :class:`~moa.serve.ray_options.RayServeOptions` fields (strings are converted).
    """
    return build_app(RayServeOptions.model_validate(dict(args)))


def serve_on_ray(args: argparse.Namespace, announce: Callable[[str], None] = logger.info) -> int:
    """``moa serve --backend ray``: run the application until SIGINT/SIGTERM, then remove it.

    Connects to the cluster in ``RAY_ADDRESS`` when set, else starts a local Ray (and stops it
    at the end). The HTTP endpoint is Ray Serve's proxy on ``--host``/``--port``.

    Args:
        args: ``moa serve``'s parsed arguments.
        announce: Called with a line giving the endpoint once every replica is up.
    """
    import ray

    options = RayServeOptions.from_namespace(args)
    local = not os.environ.get("RAY_ADDRESS")
    ray.init(**({"include_dashboard": False} if local else {}))
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
        replicas = options.replicas if options.autoscaling is None else "autoscaled"
        announce(f"moa serve (Ray, {replicas} engine replicas): http://{args.host}:{args.port}/v1")
        _wait_for_signal()
    finally:
        logger.info("Removing the Ray Serve application %r.", APP_NAME)
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0


def _wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
