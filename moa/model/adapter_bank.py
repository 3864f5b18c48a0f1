"""AdapterBank: the adapters loaded on one base — slots, install/remove, validation, locking.

Every part of moa that adds, removes or looks up adapters (the model's PEFT-style verbs,
``moa.merge``, ``moa.train``, ``moa.testing``) goes through this public API; it is the
only place the layout of the adapters changes.

Concurrency: calls of the model (``forward``/``generate``/``route``) hold the bank's
*read* side for their whole duration, so any number of them run at once; ``install`` and
``remove`` take the *write* side and wait until the running calls finish. A slot index
therefore means the same adapter from the start to the end of every call. The lock is fair:
a waiting change holds new calls back (steady traffic cannot starve a load or an eviction),
and the calls that queued behind it go before the next change. Changing the bank from
inside a call of the same thread (a router that loads an adapter, say) would wait forever,
so it is refused with a clear error instead.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import unicodedata
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from moa.adapters.base import AdapterConfig, AdapterLayer
from moa.errors import (
    AdapterExistsError,
    AdapterNameError,
    AdapterShapeError,
    InputLimitError,
    MoaError,
    UnknownAdapterError,
    format_choices,
)
from moa.model.mixture_linear import MixtureLinear

logger = logging.getLogger(__name__)

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")
#: Longest adapter name accepted.
MAX_NAME_LENGTH = 128
#: Most adapters one model holds by default (``MixtureModel(max_adapters=...)``).
DEFAULT_MAX_ADAPTERS = 1024
#: PEFT's name for "no adapter" in ``adapter_names``.
BASE_ROW = "__base__"
#: The name that asks the router to decide a row (in ``adapter_names`` / ``adapter_weights``).
AUTO_ROW = "auto"
_RESERVED = (BASE_ROW, AUTO_ROW)


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it is a valid adapter name: 1-128 ASCII letters, digits, ``_`` or ``-``.

    Adapter names become folder names (``save_pretrained``), URL parts and metric labels, so a
    path separator, ``..``, a control, bidi or zero-width character, or a non-ASCII look-alike
    (Cyrillic ``ѕ``, fullwidth ``ｓ``) is refused, as are the reserved names.

    Raises:
        AdapterNameError: naming the first offending character (and its Unicode name).
    """
    if isinstance(name, str) and _NAME_PATTERN.fullmatch(name) and len(name) <= MAX_NAME_LENGTH:
        if name in _RESERVED:
            raise AdapterNameError(f"Invalid adapter name {name!r}: it is reserved (reserved names: "
                                   f"{format_choices(_RESERVED)}). Pick another name.")
        return name
    if not isinstance(name, str) or not name:
        why = f"it is {'empty' if name == '' else 'a ' + type(name).__name__}"
    elif len(name) > MAX_NAME_LENGTH:
        why = f"it is {len(name)} characters long, above {MAX_NAME_LENGTH}"
    else:
        bad = next(c for c in name if not _NAME_PATTERN.fullmatch(c))
        why = f"character {bad!r} (U+{ord(bad):04X} {unicodedata.name(bad, 'unnamed')}) is not allowed"
    raise AdapterNameError(
        f"Invalid adapter name {str(name)[:80]!r}: {why}. Use letters, digits, '_' and '-' only (ASCII; no path "
        f"separators, dots, spaces, control or look-alike characters), e.g. 'sql' or 'sql-v2'."
    )


class BankBusyError(MoaError, RuntimeError):
    """The bank was changed from inside a call of the model on the same thread."""


class ReadWriteLock:
    """Many readers or one writer, fair both ways; a thread may re-enter the read side.

    Writer-fair: once a writer waits, threads that do not already read wait too, so a steady
    stream of overlapping calls cannot keep a load or an eviction out forever (the readers
    already inside finish, then the writer goes). Phase-fair the other way: the readers that
    queued behind a writer go in when it is done, before the next writer, so a stream of
    writers cannot starve the calls either.

    A thread that already reads passes again at once (its nested calls must not queue behind
    the writer that waits for it). One rule follows from writer fairness: a thread holding
    the read side must not wait for *another* thread's read (a call it hands to a worker),
    which would queue behind a waiting writer; moa never does that.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0  # threads inside the read side
        self._writer: int | None = None  # thread inside the write side
        self._writers_waiting = 0
        self._readers_waiting = 0
        # readers that queued behind the last writer and go in before the next one
        self._admit_first = 0
        self._phase = 0  # writes finished so far
        self._local = threading.local()

    def __reduce__(self) -> tuple:
        # a copied model (copy.deepcopy, pickling) gets a fresh, unheld lock
        return (ReadWriteLock, ())

    def held_for_reading(self) -> bool:
        """Whether this thread is inside the read side."""
        return getattr(self._local, "depth", 0) > 0

    @property
    def writers_waiting(self) -> int:
        """Writers queued for the write side now (they hold new readers back)."""
        with self._cond:
            return self._writers_waiting

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the read side for the block (re-entrant on one thread)."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._acquire_read()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    def _acquire_read(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me or (self._writer is None and self._writers_waiting == 0):
                self._readers += 1  # the writer's own reads, or nobody in the way
                return
            phase = self._phase
            self._readers_waiting += 1
            try:
                # go in once no writer holds the lock and either none waits, or one finished
                # since this reader queued (then the readers queued behind it go first)
                while self._writer is not None or (self._writers_waiting and self._phase == phase):
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
                if self._phase != phase and self._admit_first:
                    self._admit_first -= 1
                    if not self._admit_first:
                        self._cond.notify_all()
            self._readers += 1

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the write side for the block (nobody reads meanwhile).

        Raises:
            BankBusyError: this thread holds the read side (waiting would never end).
        """
        if self.held_for_reading():
            raise BankBusyError(
                "Adapters cannot be added or removed from inside a call of the same model "
                "(a router or callback running within forward/generate). Change them before or "
                "after the call."
            )
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer is not None or self._readers > 0 or self._admit_first > 0:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = threading.get_ident()
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._phase += 1
                self._admit_first = self._readers_waiting
                self._cond.notify_all()


#: The former private name (pickled models made before the rename refer to it).
_ReadWriteLock = ReadWriteLock


class AdapterBank:
    """The adapters of one base model, by slot.

    Slots are positions in :attr:`names`; a :class:`~moa.routing.RoutingDecision` refers to
    adapters by slot. Every wrapped layer reads the slot order from here and rebuilds its
    kernel stack when :attr:`layout_version` changes.

    Args:
        base_model: The transformers model whose linear layers get wrapped.
        max_rank: Largest adapter rank accepted.
        max_adapters: Most adapters held at once.
    """

    def __init__(self, base_model: nn.Module, max_rank: int = 256, max_adapters: int = DEFAULT_MAX_ADAPTERS):
        self.base_model = base_model
        self.max_rank = int(max_rank)
        self.max_adapters = int(max_adapters)
        self.configs: dict[str, AdapterConfig] = {}
        self._names: tuple[str, ...] = ()
        self.layout_version = 0
        self._lock = ReadWriteLock()

    # -- reading ---------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Loaded adapters, in slot order (an immutable snapshot)."""
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self.configs

    def __len__(self) -> int:
        return len(self._names)

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold the read side: the slots do not change inside the block (re-entrant)."""
        return self._lock.reading()

    def layers(self) -> Iterator[MixtureLinear]:
        """Every wrapped layer of the base."""
        for module in self.base_model.modules():
            if isinstance(module, MixtureLinear):
                yield module

    def base_layer(self, module_name: str) -> nn.Module:
        """The original linear layer at ``module_name`` (unwrapped if moa wrapped it)."""
        module = self.base_model.get_submodule(module_name)
        return module.base_layer if isinstance(module, MixtureLinear) else module

    def adapter_layers(self, name: str) -> dict[str, AdapterLayer]:
        """Module name -> adapter ``name``'s layer on that module."""
        self.check_known([name])
        return {layer.module_name: layer.adapters[name] for layer in self.layers() if name in layer.adapters}

    # -- validation ------------------------------------------------------------------------

    def check_new_name(self, name: str) -> None:
        """Raise unless ``name`` is a valid, unused adapter name and the bank has room for one more.

        Raises:
            AdapterNameError: not a valid name (see :func:`check_adapter_name`).
            AdapterExistsError: already loaded.
            InputLimitError: the bank already holds ``max_adapters`` adapters.
        """
        check_adapter_name(name)
        if hasattr(nn.ModuleDict(), name):  # the per-layer bank is an nn.ModuleDict
            raise AdapterNameError(
                f"Invalid adapter name {name!r}: it is the name of a torch module attribute "
                f"(like 'train' or 'forward'). Pick another, e.g. {name + '_adapter'!r}."
            )
        if name in self.configs:
            raise AdapterExistsError(
                f"An adapter named {name!r} is already loaded. Loaded: "
                f"{format_choices(self._names)}. Pick another adapter_name or "
                f"delete_adapter({name!r}) first."
            )
        if len(self._names) >= self.max_adapters:
            raise InputLimitError(
                f"Cannot add adapter {name!r}: the model holds {len(self._names)} adapters, the cap "
                f"max_adapters={self.max_adapters}. Delete one (model.delete_adapter(name)) or raise the cap "
                f"(MixtureModel(..., max_adapters=N))."
            )

    def check_known(self, names: Sequence[str]) -> None:
        """Raise :class:`UnknownAdapterError` for the first name that is not loaded."""
        for name in names:
            if name not in self.configs:
                raise UnknownAdapterError(
                    f"No adapter named {name!r}. Loaded: {format_choices(self._names)}. "
                    f"Load it with model.load_adapter(path, adapter_name={name!r})."
                )

    # -- changing --------------------------------------------------------------------------

    def install(
        self, name: str, config: AdapterConfig, layers: Mapping[str, AdapterLayer], trainable: bool
    ) -> None:
        """Attach fully built layers as adapter ``name``; all checks happen before any change.

        Args:
            name: New adapter name (checked with :meth:`check_new_name`).
            config: Its config (kept in :attr:`configs`).
            layers: Module name -> built adapter layer.
            trainable: Whether its parameters require gradients.
        """
        with self._lock.writing():
            self.check_new_name(name)
            for module_name, layer in layers.items():
                low_rank = layer.low_rank()
                if low_rank is not None and low_rank[0].shape[0] > self.max_rank:
                    raise AdapterShapeError(
                        f"Adapter {name!r} has rank {low_rank[0].shape[0]} on {module_name!r}, above "
                        f"this model's cap max_rank={self.max_rank}. Raise it with "
                        f"MixtureModel.from_pretrained(..., max_rank=...)."
                    )
            for module_name, layer in layers.items():
                base_layer = self.base_layer(module_name)
                weight = next(base_layer.parameters())
                layer.to(device=weight.device)
                layer.attach_base(base_layer)
                layer.requires_grad_(trainable)
                wrapper = self.base_model.get_submodule(module_name)
                if not isinstance(wrapper, MixtureLinear):
                    wrapper = MixtureLinear(base_layer, module_name, self)
                    parent_name, _, child = module_name.rpartition(".")
                    setattr(self.base_model.get_submodule(parent_name), child, wrapper)
                # new modules start in training mode; an eval-mode base must not get adapter dropout
                wrapper.train(base_layer.training)
                layer.train(base_layer.training)
                wrapper.add_adapter_layer(name, layer)
            self.configs[name] = config
            self._names = (*self._names, name)
            self.layout_version += 1
        logger.info("Adapter %r ready on %d modules.", name, len(layers))

    def remove(self, name: str) -> AdapterConfig:
        """Detach adapter ``name`` from every layer; returns its config."""
        with self._lock.writing():
            self.check_known([name])
            for layer in self.layers():
                layer.remove_adapter_layer(name)
            config = self.configs.pop(name)
            self._names = tuple(n for n in self._names if n != name)
            self.layout_version += 1
        return config

    def unwrap_all(self) -> None:
        """Put every original linear layer back in place of its wrapper (adapters dropped)."""
        with self._lock.writing():
            for layer in list(self.layers()):
                parent_name, _, child = layer.module_name.rpartition(".")
                setattr(self.base_model.get_submodule(parent_name), child, layer.base_layer)
            self.configs.clear()
            self._names = ()
            self.layout_version += 1
