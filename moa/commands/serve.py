"""``moa serve``: an OpenAI-compatible server over one base and many adapters (continuous batching).

Loads the base (NF4 by default), the adapters (by default the five shipped demo adapters
and the shipped learned gate as the router), starts the engine thread and serves the HTTP
app (:func:`moa.serve.app.create_app`) with uvicorn. SIGINT/SIGTERM: uvicorn stops accepting
connections and waits up to ``--shutdown-timeout`` seconds for the open ones, then the engine
finishes what is still in flight (cancelling it after the same timeout) and stops.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from moa.errors import MissingDependencyError
from moa.serve.launch import default_modules, load_router, parse_lora_modules, served_name

logger = logging.getLogger(__name__)

#: Default of ``--max-request-bytes``; the same as ``moa.serve.app.DEFAULT_MAX_REQUEST_BYTES``
#: (not imported: ``moa --help`` must work without the serve extra).
MAX_REQUEST_BYTES = 1 << 20


def max_loras_arg(text: str) -> int:
    """``--max-loras``: a count >= 1, or ``0`` / ``none`` / ``unlimited`` for no limit (returned as 0).

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    value = text.strip().lower()
    if value in ("none", "unlimited"):
        return 0
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a count of adapters (1, 2, ...) or 0/none for no limit; "
                                         f"got {text!r}")
    return count


def _require_serving_deps() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingDependencyError(
            f"moa serve needs {', '.join(missing)}, which are not installed. Run: pip install 'moa[serve]'."
        )


def build_server(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Load everything and return ``(uvicorn.Server, engine, app)`` (the engine started)."""
    import uvicorn

    import moa
    from moa.serve.adapter_cache import AdapterCache
    from moa.serve.app import create_app
    from moa.serve.engine import Engine

    modules, router_folder = default_modules() if not args.lora_modules else (parse_lora_modules(args.lora_modules), None)
    if args.router:
        router_folder = Path(args.router)
    router, routed = load_router(None if args.no_router else router_folder, modules,
                                 "Add them with --lora-modules NAME=SOURCE, or pass --no-router.")
    model = moa.MixtureModel.from_pretrained(args.base, quantization=None if args.quantization == "none" else "nf4")
    engine = Engine(model, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                    deterministic=args.deterministic, mixed_steps=not args.separate_prefill,
                    max_prompt_tokens=args.max_prompt_tokens,
                    max_prefill_tokens=args.max_prefill_tokens, max_step_tokens=args.max_step_tokens,
                    prefix_cache_bytes=int(args.prefix_cache_mb * 2**20))
    sized = args.max_loras is not None  # not given: sized from memory once an adapter is in (0: no limit)
    cache = AdapterCache(engine, model, max_loras=args.max_loras or None,
                         allow_runtime_loading=args.allow_runtime_loading, pinned=set(routed))
    order = routed + [n for n in modules if n not in routed]  # the router's adapters first: pinned, resident
    for name in order:
        if not sized and name not in routed and cache.resident():
            cache.size_from_memory(modules.values())
            sized = True
        if cache.max_loras is None or len(cache.resident()) < cache.max_loras or name in routed:
            record = cache.load(name, modules[name], startup=True)
            logger.info("Adapter %s: %s (%.2f s).", name, modules[name], record.load_seconds)
        else:
            cache.register(name, modules[name], startup=True)  # loads when first asked for
    if not sized:
        cache.size_from_memory(modules.values())
    if router is not None:
        model.set_router(router)
    engine.start()
    app = create_app(engine, model, cache, served_model_name=served_name(args.served_model_name, args.base), api_key=args.api_key,
                     max_request_bytes=args.max_request_bytes, allow_runtime_loading=args.allow_runtime_loading)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    return uvicorn.Server(config), engine, app


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, then drain and stop."""
    _require_serving_deps()
    if getattr(args, "backend", "local") == "ray":
        return _serve_on_ray(args)
    server, engine, app = build_server(args)
    names = app.state.names
    print(f"moa serve: http://{args.host}:{args.port}/v1  models: {', '.join(names.choices())}", flush=True)
    received = _note_signals()
    try:
        server.run()  # returns after SIGINT/SIGTERM, once open connections closed (or the timeout)
    finally:
        logger.info("Stopping the engine (signals: %s); in-flight requests get %.0f s.", received,
                    args.shutdown_timeout)
        engine.shutdown(timeout=args.shutdown_timeout)
    return 0


def _serve_on_ray(args: argparse.Namespace) -> int:
    """``--backend ray``: the same server as Ray Serve replicas (:mod:`moa.serve.ray_app`)."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "moa serve --backend ray needs Ray Serve, which is not installed. Run: pip install 'moa[serve,ray]'."
        ) from None
    from moa.serve.ray_app import serve_on_ray

    return serve_on_ray(args, announce=lambda line: print(line, flush=True))


def _note_signals() -> list[int]:
    """Record SIGINT/SIGTERM instead of dying, so the engine is drained after uvicorn stops.

    uvicorn handles the signals while it runs, then restores the previous handlers and
    raises the signal again; with these handlers in place that second delivery is only
    noted, and ``cmd_serve`` goes on to stop the engine and exit 0.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        return received

    def note(sig: int, frame: Any) -> None:
        received.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note)
    return received


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``."""
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server: one base, many adapters, per-request routing, continuous batching",
        description=(
            "Serves /v1/completions and /v1/chat/completions (streaming with stream=true), /v1/models, "
            "vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, /health and /metrics (Prometheus). "
            "A request's \"model\" picks the routing: the base (--served-model-name), an adapter name, "
            "BASE:ADAPTER, or auto (the router decides from the prompt); moa's extension field "
            "adapter_weights ({\"sql\": 0.7, \"code\": 0.3}) asks for an exact mixture. One engine thread "
            "batches every running request at each step (rows join and leave between steps). Needs the "
            "serve extra: pip install 'moa[serve]'."
        ),
    )
    p.add_argument("--base", default="default",
                   help="base model: 'default' (SmolLM2-135M-Instruct, shipped; the default), a local folder or a "
                        "cached Hub id")
    p.add_argument("--quantization", default="nf4", choices=["nf4", "none"],
                   help="nf4 (default): 4-bit NF4 base (bitsandbytes); none: dense base")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default %(default)s)")
    p.add_argument("--served-model-name", default=None,
                   help="the base's name in the API (default: derived from --base, e.g. SmolLM2-135M-Instruct)")
    p.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=SOURCE",
                   help="adapters to serve; SOURCE is a folder, a Hub id (owner/name[@revision]) or a registry "
                        "name (default: the five shipped demo adapters, with the shipped learned gate as router)")
    p.add_argument("--router", default=None,
                   help="router folder (router_config.json + weights) for model='auto' (default: the shipped gate "
                        "when --lora-modules is not given, else none)")
    p.add_argument("--no-router", action="store_true", help="serve without a router ('auto' is then refused)")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoded together at each step, at most (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot, at most; more get 429 with Retry-After (default %(default)s)")
    p.add_argument("--max-loras", type=max_loras_arg, default=None, metavar="N",
                   help="adapters resident in the model at once; more are evicted least-recently-used first "
                        "(pinned: the router's) and reloaded when a request names them. Default: sized from "
                        "the memory free at start (a quarter of it, counting 3x the largest adapter's weights "
                        "per adapter), at most 64, and logged; 0 or 'none': no limit")
    p.add_argument("--allow-runtime-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (as vLLM's "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every /v1 route (/health and /metrics stay open)")
    p.add_argument("--deterministic", action="store_true",
                   help="prefill and decode each request alone: answers bit-identical to model.generate of that request, "
                        "at the cost of batching")
    p.add_argument("--separate-prefill", action="store_true",
                   help="prefill requests that arrive while others decode in forwards of their own, instead of "
                        "in chunks inside the running rows' decode steps (the default, as vLLM's chunked prefill; "
                        "also turns prefix caching off)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default: the base's context minus 1); longer get 400")
    p.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="prompt tokens prefilled together in one packed forward when no request is decoding "
                        "(default %(default)s)")
    p.add_argument("--max-step-tokens", type=int, default=128,
                   help="tokens of one step while requests decode: one per decoding request, the rest for chunks "
                        "of arriving prompts (a longer prompt is spread over several steps, so the running "
                        "requests keep their pace; vLLM's max_num_batched_tokens) (default %(default)s)")
    p.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="MiB of prompt-prefix keys/values kept for reuse by later requests with the same "
                        "prefix and the same routing (0: off) (default %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help="largest request body accepted, in bytes; larger get 413 (default %(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish on SIGINT/SIGTERM before cancelling them "
                        "(default %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default %(default)s)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local (default): one engine in this process; ray: --replicas engines as Ray Serve "
                        "replicas behind one endpoint, each request routed to a replica holding its adapters "
                        "(a local Ray, or the cluster in RAY_ADDRESS; needs the ray extra; docs/scaling.md)")
    p.add_argument("--replicas", type=int, default=1,
                   help="with --backend ray: engine replicas (each loads the base; default %(default)s)")
    p.set_defaults(func=cmd_serve)
