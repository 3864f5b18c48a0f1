"""The settings of ``moa serve`` on Ray Serve, and what each engine replica builds from them.

One :class:`RayServeOptions` describes the whole application (:mod:`moa.serve.ray_app`): what
every engine replica serves (the base, the adapters it may load, the router, the engine's
limits — the same meanings as ``moa serve``'s options) and how Ray runs the replicas (how
many, or an autoscaling range; how many requests each takes at once; their CPUs/GPUs). It is
a pydantic model, so the same fields come from ``moa serve --backend ray`` (:meth:`from_namespace`),
from ``serve run moa.serve.ray_app:build key=value ...`` (strings, converted) and from a
``serve.yaml``'s ``args:`` (YAML types).

This module does not import Ray: ``moa serve --help`` and the CLI's missing-extra message
work without it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moa.serve.launch import default_modules, load_router, parse_lora_modules, served_name

logger = logging.getLogger(__name__)

#: ``max_ongoing_requests`` of an engine replica per row of its batch
#: (see :meth:`RayServeOptions.replica_max_ongoing`).
ONGOING_PER_BATCH_ROW = 2
#: Residency keys an engine replica keeps when neither ``keys_per_replica`` nor a finite
#: ``max_loras`` sizes it.
DEFAULT_KEYS_PER_REPLICA = 16


class RayServeOptions(BaseModel):
    """Everything the Ray Serve application of ``moa serve`` needs.

    Attributes:
        base: ``default`` (the shipped SmolLM2-135M-Instruct), a local folder or a cached Hub id:
            the same on every node.
        quantization: ``nf4`` or ``none``.
        served_model_name: The base's name in the API (default: derived from ``base``).
        lora_modules: ``{name: source}`` (a folder, ``owner/name[@revision]`` on the Hub, or a
            registry name); ``None``: the shipped demo adapters with the shipped gate. Every
            replica may load each of them; none is loaded before a request needs it (the
            router's adapters excepted: pinned, loaded at start).
        router: A router folder (default: the shipped gate when ``lora_modules`` is ``None``).
        no_router: Serve without a router (``auto`` is refused).
        max_loras: Adapters resident in one replica at once (LRU eviction); ``None``: sized
            from the memory free at start, as ``moa serve``; ``0``: no limit.
        keys_per_replica: Residency keys (an adapter, a mixture's adapter set, ``auto``) Ray
            counts a replica as holding, for its routing (``@serve.multiplexed``'s
            ``max_num_models_per_replica``); default: the replica's ``max_loras`` (16 without one).
        replicas: Engine replicas (ignored with ``autoscaling``).
        autoscaling: Ray Serve's ``autoscaling_config`` for the engine replicas
            (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``...);
            ``target_ongoing_requests`` defaults to ``max_batch_size``.
        max_ongoing_requests: Requests one engine replica takes at once before Ray routes
            elsewhere (default :data:`ONGOING_PER_BATCH_ROW` x ``max_batch_size``).
        replica_cpus: CPUs Ray reserves for each engine replica.
        replica_gpus: GPUs Ray reserves for each engine replica.
        threads: Torch threads in each engine replica (default: as Ray sets them, one per
            reserved CPU).
        ingress_replicas: Replicas of the ingress (it only parses and forwards).
        ingress_cpus: CPUs Ray reserves for each ingress replica (default 0, as Ray's own proxy:
            it awaits the engines, and a whole CPU reserved for it would keep an engine replica
            from being placed on a small machine).
        affinity: Route each request by its residency key (Ray's model multiplexing); off:
            Ray's plain power-of-two-choices routing (for comparison; replicas still load
            what their requests need).
        max_batch_size, max_queue, deterministic, separate_prefill, max_prompt_tokens,
        max_prefill_tokens, max_step_tokens, prefix_cache_mb, max_request_bytes, api_key: as
            ``moa serve``'s options of those names.
        engine_options: More keyword arguments of :class:`~moa.serve.engine.Engine` (for the
            engine's other settings).
    """

    model_config = ConfigDict(extra="forbid")

    base: str = "default"
    quantization: Literal["nf4", "none"] = "nf4"
    served_model_name: str | None = None
    lora_modules: dict[str, str] | None = None
    router: str | None = None
    no_router: bool = False
    max_loras: int | None = Field(default=None, ge=0)
    keys_per_replica: int | None = Field(default=None, ge=1)
    replicas: int = Field(default=1, ge=1)
    autoscaling: dict[str, Any] | None = None
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    replica_cpus: float = Field(default=1.0, ge=0)
    replica_gpus: float = Field(default=0.0, ge=0)
    threads: int | None = Field(default=None, ge=1)
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_cpus: float = Field(default=0.0, ge=0)
    affinity: bool = True
    max_batch_size: int = Field(default=16, ge=1)
    max_queue: int = Field(default=64, ge=1)
    deterministic: bool = False
    separate_prefill: bool = False
    max_prompt_tokens: int | None = None
    max_prefill_tokens: int = Field(default=2048, ge=1)
    max_step_tokens: int = Field(default=128, ge=1)
    prefix_cache_mb: float = Field(default=256, ge=0)
    max_request_bytes: int = Field(default=1 << 20, ge=1)
    api_key: str | None = None
    engine_options: dict[str, Any] | None = None

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _modules(cls, value: Any) -> Any:
        """``"sql=./a code=alice/code@v1"``, ``["sql=./a", ...]`` or a mapping."""
        if isinstance(value, str):
            value = value.replace(",", " ").split()
        if isinstance(value, (list, tuple)):
            return parse_lora_modules([str(v) for v in value]) or None
        return value

    # -- from the command line -------------------------------------------------------------

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> RayServeOptions:
        """The options of ``moa serve --backend ray ...`` (its parsed arguments)."""
        fields = {name: getattr(args, name) for name in cls.model_fields if getattr(args, name, None) is not None}
        fields.pop("lora_modules", None)
        if getattr(args, "lora_modules", None):
            fields["lora_modules"] = parse_lora_modules(args.lora_modules)
        return cls(**fields)

    # -- derived ---------------------------------------------------------------------------

    def replica_max_ongoing(self) -> int:
        """``max_ongoing_requests`` of an engine replica.

        A batching engine wants a full batch running and the next one waiting to join, not
        more: past that a request waits less on a replica with room, even one that loads its
        adapter first. Hence :data:`ONGOING_PER_BATCH_ROW` x ``max_batch_size`` by default.
        """
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return ONGOING_PER_BATCH_ROW * self.max_batch_size

    def engine_deployment_options(self) -> dict[str, Any]:
        """Ray Serve deployment options of the engine replicas."""
        actor: dict[str, Any] = {"num_cpus": self.replica_cpus}
        if self.replica_gpus:
            actor["num_gpus"] = self.replica_gpus
        options: dict[str, Any] = {"max_ongoing_requests": self.replica_max_ongoing(), "ray_actor_options": actor}
        if self.autoscaling is not None:
            options["autoscaling_config"] = {"target_ongoing_requests": self.max_batch_size, **self.autoscaling}
        else:
            options["num_replicas"] = self.replicas
        return options

    def keys_for(self, max_loras: int | None) -> int:
        """Residency keys a replica holds, given its adapter cache's ``max_loras``."""
        if self.keys_per_replica is not None:
            return self.keys_per_replica
        return max_loras if max_loras else DEFAULT_KEYS_PER_REPLICA

    def served_name(self) -> str:
        """The base's name in the API (as ``moa serve`` derives it)."""
        return served_name(self.served_model_name, self.base)

    def modules_and_router(self) -> tuple[dict[str, str], Path | None]:
        """``({name: source}, router folder or None)``, the defaults filled in as ``moa serve`` does."""
        if self.lora_modules:
            modules, router = dict(self.lora_modules), None
        else:
            modules, router = default_modules()
        if self.router:
            router = Path(self.router)
        return modules, None if self.no_router else router


def build_replica(options: RayServeOptions) -> tuple[Any, Any, Any, Any]:
    """Load and start what one engine replica serves; return ``(engine, model, cache, app)``.

    As ``moa serve`` (:func:`moa.commands.serve.build_server`), except that only the router's
    adapters (pinned) are loaded here: every other adapter is registered with its source and
    loaded when a request first needs it, so a replica holds what its traffic asks for.

    Raises:
        AdapterFormatError: the router routes to adapters that are not served.
    """
    import moa
    from moa.serve.adapter_cache import AdapterCache
    from moa.serve.app import create_app
    from moa.serve.engine import Engine

    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    modules, router_folder = options.modules_and_router()
    router, routed = load_router(router_folder, modules, "Add them to lora_modules, or set no_router.")
    model = moa.MixtureModel.from_pretrained(options.base,
                                             quantization=None if options.quantization == "none" else "nf4")
    engine = Engine(model, max_batch_size=options.max_batch_size, max_queue=options.max_queue,
                    deterministic=options.deterministic, mixed_steps=not options.separate_prefill,
                    max_prompt_tokens=options.max_prompt_tokens, max_prefill_tokens=options.max_prefill_tokens,
                    max_step_tokens=options.max_step_tokens,
                    prefix_cache_bytes=int(options.prefix_cache_mb * 2**20), **(options.engine_options or {}))
    cache = AdapterCache(engine, model, max_loras=options.max_loras or None, allow_runtime_loading=False,
                         pinned=set(routed))
    for name in routed:
        cache.load(name, modules[name], startup=True)
    for name, source in modules.items():
        if name not in routed:
            cache.register(name, source, startup=True)  # loaded when a request first needs it
    if options.max_loras is None:
        cache.size_from_memory(modules.values())
    if router is not None:
        model.set_router(router)
    engine.start()
    app = create_app(engine, model, cache, served_model_name=options.served_name(), api_key=options.api_key,
                     max_request_bytes=options.max_request_bytes, allow_runtime_loading=False)
    logger.info("Engine replica ready: %d adapters known, %s resident (max_loras=%s).", len(modules),
                cache.resident(), cache.max_loras)
    return engine, model, cache, app
