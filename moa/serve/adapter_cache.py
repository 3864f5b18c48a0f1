"""Which adapters are resident in the served model, and which one to evict (LRU).

The model holds at most ``max_loras`` adapters at once. Every adapter the server knows has
a *source* (a folder, a Hub id with an optional ``@revision``, or a registry name); a known
adapter that is not resident is loaded just in time when a request names it, after the
least-recently-used adapter that is neither pinned nor in use (queued or running in the
engine, or leased by a request on its way in) is evicted. Loads go through moa's verified
pulls (:func:`moa.hub.pull.resolve_adapter_folder`, :func:`moa.hub.pull.pull_registered`)
and every change to the model runs on the engine thread (:meth:`Engine.call`), between
two decoding steps.

Adapters of every kind are served the same way: Linear-level ones (LoRA, ...) and input-level
ones (prompt / prefix tuning: a PEFT ``PROMPT_TUNING`` / ``PREFIX_TUNING`` folder, read by the
type registered for its ``peft_type``) load, count towards ``max_loras``, are evicted and
unloaded alike.

Stale weights: the cache never keeps weights, only sources. A resident adapter is identified
by its :class:`ResidentAdapter` record (name + resolved folder + load time); a reload (an
evicted adapter coming back, or ``load`` of a resident name with a new source) reads the
source again and replaces the model's adapter under that name in ONE engine call (delete +
install), and only when no request names it, so no row ever mixes old and new weights and
every request admitted afterwards sees the new ones.

Example::

    cache = AdapterCache(engine, model, max_loras=8, allow_runtime_loading=True, pinned={"sql"})
    cache.load("code", "alice/code-lora@v2")      # Hub id at a revision, verified
    cache.ensure(["code"])                        # loads it again if it was evicted
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moa.serve.requests import BadRequestError, ConflictError, UnknownModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidentAdapter:
    """One load of one adapter: the identity of the weights the model holds under ``name``.

    Attributes:
        name: Adapter name in the model.
        source: What it was loaded from (``None``: added to the model before the cache existed).
        folder: The verified local folder the weights were read from.
        loaded_at: ``time.time()`` of the load (a reload gets a new record).
        load_seconds: Wall time of the load (resolve + read + install).
    """

    name: str
    source: str | None
    folder: Path | None
    loaded_at: float
    load_seconds: float


@dataclass
class _Registration:
    source: str | None
    startup: bool
    last_used: float = field(default_factory=time.monotonic)


def resolve_source(source: str, *, max_rank: int | None = None) -> Path:
    """The verified local folder of an adapter source.

    Args:
        source: A folder; a Hub id ``owner/name`` with an optional ``@revision``; or a
            registry name (``moa registry list``).
        max_rank: Rank cap checked while pulling.

    Raises:
        AdapterFormatError, HubError, RegistryError, IntegrityError...: as the pulls raise them.
    """
    from moa.hub.pull import pull_registered
    from moa.hub.sources import resolve_adapter_folder

    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if "/" in source and not source.startswith((".", "/", "~")):
        repo_id, _, revision = source.partition("@")
        return resolve_adapter_folder(repo_id, revision or None, max_rank=max_rank)
    if path.exists() or source.startswith((".", "/", "~")):
        return resolve_adapter_folder(path, max_rank=max_rank)  # raises its "not a folder" error
    return pull_registered(source, max_rank=max_rank)


def install_input_adapter(model: Any, name: str, adapter: Any) -> None:
    """Add a built input-level adapter to ``model`` as ``name``, not trainable (engine thread).

    The name is checked as ``model.load_adapter`` checks it (free among every adapter, valid,
    under the model's cap) before the model changes.

    Raises:
        AdapterExistsError, AdapterNameError, InputLimitError: as ``model.load_adapter``.
    """
    model.bank.check_new_name(name)
    model.input_adapters.check_new_name(name)
    model.input_adapters.install(name, adapter, model.device, trainable=False, training=model.base_model.training)


def _size(nbytes: int | None) -> str:
    return "unknown" if not nbytes else f"{nbytes / (1 << 20):.1f} MiB"


class AdapterCache:
    """Resident adapters of the served model, their sources, last use and LRU eviction.

    Thread-safe: queries and leases take a short lock only (the event loop calls them);
    loads, evictions and unloads are serialised by a second lock and block on the engine
    thread, so call those from worker threads.

    Args:
        engine: The serving engine (``call``, ``in_use``).
        model: The served :class:`~moa.MixtureModel`; adapters it already holds are adopted
            as resident (never evicted: their source is unknown).
        max_loras: Resident adapters at most (``None``: no limit).
        allow_runtime_loading: Whether adapters loaded at run time may come back after eviction.
        pinned: Adapters never evicted (the router's adapters are pinned too).
    """

    def __init__(self, engine: Any, model: Any, *, max_loras: int | None = None,
                 allow_runtime_loading: bool = False, pinned: Iterable[str] = ()) -> None:
        if max_loras is not None and max_loras < 1:
            raise BadRequestError(f"max_loras must be >= 1 (or None for no limit); got {max_loras!r}.")
        self.engine = engine
        self.model = model
        self.max_loras = max_loras
        self.allow_runtime_loading = allow_runtime_loading
        self.pinned = set(pinned)
        self.evictions = 0
        self._lock = threading.RLock()  # short: the dicts below
        self._changing = threading.Lock()  # long: one load / unload at a time
        self._leases: Counter[str] = Counter()
        self._registered: dict[str, _Registration] = {}
        self._resident: dict[str, ResidentAdapter] = {}
        now = time.time()
        for name in model.adapter_names:
            self._registered[name] = _Registration(None, startup=True)
            self._resident[name] = ResidentAdapter(name, None, None, now, 0.0)

    # -- queries ---------------------------------------------------------------------------

    def resident(self) -> list[str]:
        """Adapters in the model now, most recently used last."""
        with self._lock:
            return sorted(self._resident, key=lambda n: self._registered[n].last_used)

    def registered(self) -> list[str]:
        """Every adapter a request may name (resident, or loadable on demand), sorted."""
        with self._lock:
            return sorted(n for n in self._registered if self.known(n))

    def record(self, name: str) -> ResidentAdapter | None:
        """The resident record of ``name`` (``None`` when not resident)."""
        with self._lock:
            return self._resident.get(name)

    def source(self, name: str) -> str | None:
        """Where ``name`` loads from (``None``: unknown, or added to the model directly)."""
        with self._lock:
            entry = self._registered.get(name)
            return entry.source if entry is not None else None

    def load_seconds(self) -> dict[str, float]:
        """Adapter -> seconds its latest load took (resident adapters)."""
        with self._lock:
            return {n: r.load_seconds for n, r in self._resident.items()}

    def known(self, name: str) -> bool:
        """Whether a request may name ``name``: resident, or evicted and reloadable.

        An evicted adapter is reloaded just in time if it was given at start-up or runtime
        loading is allowed, and its source is known.
        """
        with self._lock:
            if name in self._resident:
                return True
            entry = self._registered.get(name)
            return entry is not None and entry.source is not None and (
                entry.startup or self.allow_runtime_loading)

    def protected(self) -> set[str]:
        """Adapters that cannot be evicted or unloaded now: pinned, routed to, in use, leased."""
        in_use = {n for n, count in self.engine.in_use().items() if count > 0}
        with self._lock:
            leased = {n for n, count in self._leases.items() if count > 0}
        return self.pinned | self.router_adapters() | in_use | leased

    def router_adapters(self) -> set[str]:
        """Adapters the model's router routes to (they must stay loaded for ``auto``)."""
        router = getattr(self.model, "router", None)
        return set(getattr(router, "gate_adapters", None) or ())

    def size_from_memory(self, sources: Iterable[str] = ()) -> int:
        """Set :attr:`max_loras` from the free memory and the largest adapter known; return it.

        For ``moa serve`` without ``--max-loras`` (see :mod:`moa.serve.lora_budget`). The
        largest adapter is the largest resident one (its weights in the model) or the
        largest local folder among ``sources`` (its weight files); the result keeps room for
        one adapter beside the pinned ones.

        Args:
            sources: Adapter sources known but maybe not loaded yet (folders are measured).
        """
        from moa.serve import lora_budget

        sizes = [lora_budget.resident_adapter_bytes(self.model, name) for name in self.resident()]
        sizes += [lora_budget.weight_file_bytes(source) for source in sources]
        largest = max(sizes, default=0)
        available = lora_budget.available_memory_bytes(self.model.device)
        floor = len(self.pinned | self.router_adapters()) + 1
        self.max_loras = lora_budget.default_max_loras(available, largest, floor=floor)
        logger.info(
            "max_loras=%d (not given: sized from %s free on %s and the largest adapter's %s, at most %d; "
            "--max-loras N sets it, --max-loras 0 lifts the limit).", self.max_loras,
            _size(available), self.model.device, _size(largest), max(floor, lora_budget.DEFAULT_MAX_LORAS_CAP))
        return self.max_loras

    # -- use -------------------------------------------------------------------------------

    def touch(self, names: Iterable[str]) -> None:
        """Mark adapters as just used (the LRU order)."""
        now = time.monotonic()
        with self._lock:
            for name in names:
                if name in self._registered:
                    self._registered[name].last_used = now

    @contextlib.contextmanager
    def lease(self, names: Iterable[str]) -> Iterator[None]:
        """Keep ``names`` from eviction while a request is on its way to the engine.

        Hold it from :meth:`ensure` until :meth:`Engine.submit` returned (then the engine
        counts the request in ``in_use``).
        """
        held = list(names)
        with self._lock:
            self._leases.update(held)
        try:
            yield
        finally:
            with self._lock:
                self._leases.subtract(held)
                for name in held:
                    if self._leases[name] <= 0:
                        del self._leases[name]

    def ensure(self, names: Iterable[str]) -> None:
        """Make every adapter in ``names`` resident (loading evicted ones), and touch them.

        Raises:
            UnknownModelError: a name the server does not know (listing the known ones).
            ConflictError: no room (every resident adapter is pinned or in use).
        """
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if not self.known(name):
                raise UnknownModelError(
                    f"Adapter {name!r} is not served. Available: {', '.join(self.registered()) or '(none)'}. "
                    f"Load it with POST /v1/load_lora_adapter (needs --allow-runtime-loading)."
                )
        for name in wanted:
            if name in self._resident:
                continue
            with self._changing:
                with self._lock:
                    entry = self._registered.get(name)
                if name in self._resident or entry is None or entry.source is None:
                    continue  # loaded meanwhile (or unloaded: the engine reports it unknown)
                logger.info("Loading evicted adapter %r again from %s.", name, entry.source)
                self._load_locked(name, entry.source, startup=entry.startup)
        self.touch(wanted)

    # -- changes ---------------------------------------------------------------------------

    def register(self, name: str, source: str, *, startup: bool = True) -> None:
        """Know ``name`` and its source without loading it (it loads when first named)."""
        with self._lock:
            if name not in self._resident:
                self._registered[name] = _Registration(source, startup=startup, last_used=0.0)

    def load(self, name: str, source: str, *, startup: bool = False) -> ResidentAdapter:
        """Load ``name`` from ``source`` (evicting the LRU adapter if full); replaces a resident ``name``.

        Args:
            name: Adapter name (letters, digits, ``_``, ``-``).
            source: A folder, a Hub id (``owner/name`` or ``owner/name@revision``) or a registry name.
            startup: Given at start-up (``--lora-modules``): reloadable after eviction even
                without runtime loading.

        Returns:
            The new resident record (its ``load_seconds`` is the load latency).

        Raises:
            ConflictError: ``name`` is in use (a replacement would change running requests),
                or the cache is full of pinned / in-use adapters.
            MoaError subclasses: the source cannot be resolved or is not a valid adapter
                for this base (nothing changes then).
        """
        with self._changing:
            return self._load_locked(name, source, startup=startup)

    def unload(self, name: str) -> None:
        """Remove ``name`` from the model and forget it.

        Raises:
            UnknownModelError: not a known adapter (listing the known ones).
            ConflictError: queued or running requests name it, or the router routes to it.
        """
        with self._changing:
            if name not in self._registered:
                raise UnknownModelError(
                    f"Adapter {name!r} is not loaded. Loaded: {', '.join(self.registered()) or '(none)'}."
                )

            self._check_free(name, "unload")  # fail fast; checked again on the engine thread

            def remove() -> None:  # on the engine thread: no request can be half-admitted now
                self._check_free(name, "unload")
                if name in self._resident:
                    self.model.delete_adapter(name)

            self.engine.call(remove)
            with self._lock:
                self._resident.pop(name, None)
                del self._registered[name]
                self.pinned.discard(name)
        logger.info("Unloaded adapter %r.", name)

    def _check_free(self, name: str, action: str) -> None:
        """Raise :class:`ConflictError` if ``name`` is routed to, in use or leased.

        Call it on the engine thread: between two steps, ``engine.in_use()`` counts every
        request (none is half-way between the queue and the batch).
        """
        if name in self.router_adapters():
            raise ConflictError(
                f"Cannot {action} adapter {name!r}: the router routes to it ('auto' requests would fail). "
                f"Serve without the router (--no-router) to {action} it."
            )
        with self._lock:
            leased = self._leases.get(name, 0)
        count = self.engine.in_use().get(name, 0) + leased
        if count > 0:
            raise ConflictError(
                f"Cannot {action} adapter {name!r}: {count} queued or running request(s) use it. "
                f"Retry when they have finished."
            )

    def _load_locked(self, name: str, source: str, *, startup: bool) -> ResidentAdapter:
        """Load or replace ``name``; the caller holds ``self._changing``."""
        from moa.model import adapter_io, input_adapter_io

        started = time.perf_counter()
        folder = resolve_source(source, max_rank=getattr(self.model, "max_rank", None))
        # Read and check everything off the engine thread: decoding goes on meanwhile, and a bad
        # adapter raises here, before anything in the model changes.
        built = input_adapter_io.read_input_adapter(self.model, folder)  # None: a Linear-level adapter
        if built is None:
            config, layers = adapter_io.read_adapter(self.model, folder)
        replacing = name in self._resident
        if replacing:
            self._check_free(name, "replace")  # fail fast; checked again on the engine thread

        def install() -> list[str]:  # on the engine thread, between two steps
            evicted = []
            if replacing:
                self._check_free(name, "replace")
                self.model.delete_adapter(name)
            else:
                evicted = self._make_room()
            if built is not None:
                install_input_adapter(self.model, name, built)
            else:
                self.model.install_adapter(name, config, layers)
            return evicted

        try:
            evicted = self.engine.call(install)
        finally:  # a failed install may still have evicted (or, replacing, deleted) adapters
            present = set(self.model.adapter_names)
            with self._lock:
                for gone in [n for n in self._resident if n not in present]:
                    del self._resident[gone]
        seconds = time.perf_counter() - started
        record = ResidentAdapter(name, source, Path(folder), time.time(), seconds)
        with self._lock:
            self._resident[name] = record
            self._registered[name] = _Registration(source, startup=startup)
        logger.info("Loaded adapter %r from %s in %.3f s%s%s.", name, source, seconds,
                    " (replacing the previous weights)" if replacing else "",
                    f", evicting {evicted}" if evicted else "")
        return record

    def _make_room(self) -> list[str]:
        """Evict LRU adapters until one more fits under ``max_loras`` (engine thread); return them."""
        evicted: list[str] = []
        if self.max_loras is None:
            return evicted
        while len(self._resident) >= self.max_loras:
            protected = self.protected()
            candidates = [n for n in self.resident() if n not in protected and self._resident[n].source is not None]
            if not candidates:
                raise ConflictError(
                    f"Cannot load another adapter: {len(self._resident)} of max_loras={self.max_loras} are "
                    f"resident and none can be evicted (pinned, routed to, in use, or without a known source: "
                    f"{', '.join(self.resident())}). Retry later, unload one, or raise --max-loras."
                )
            victim = candidates[0]
            self.model.delete_adapter(victim)
            with self._lock:
                del self._resident[victim]
                self.evictions += 1
            evicted.append(victim)
            logger.info("Evicted adapter %r (least recently used).", victim)
        return evicted
