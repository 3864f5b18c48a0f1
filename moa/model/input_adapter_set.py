"""InputAdapterSet: the input-level adapters (prompt / prefix tuning...) loaded on one model.

They live apart from the :class:`~moa.model.AdapterBank`: they have no slot in a
:class:`~moa.routing.RoutingDecision`, no layer in any :class:`~moa.model.MixtureLinear`,
and routers never see them (a router chooses among Linear-level adapters). A call takes a
:meth:`snapshot` when it starts, so adding or removing one while calls run never changes
what a running call uses.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from torch import nn

from moa.adapters.input_level import InputAdapter, InputAdapterConfig
from moa.errors import AdapterConfigError, AdapterExistsError, AdapterShapeError, UnknownAdapterError, format_choices

logger = logging.getLogger(__name__)


class _Lock:
    """A mutex that a copied model (``copy.deepcopy``, pickling) gets fresh and unheld."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def __reduce__(self) -> tuple:
        return (_Lock, ())


class InputAdapterSet(nn.Module):
    """Input-level adapters by name; an ``nn.Module`` so their parameters are the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._lock = _Lock()

    @property
    def names(self) -> tuple[str, ...]:
        """Loaded input-level adapters, in load order."""
        return tuple(self.adapters.keys())

    @property
    def configs(self) -> dict[str, InputAdapterConfig]:
        """Name -> config."""
        return {name: adapter.config for name, adapter in self.adapters.items()}

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.adapters

    def __len__(self) -> int:
        return len(self.adapters)

    def snapshot(self) -> dict[str, InputAdapter]:
        """Name -> adapter as of now (what one call uses from start to end)."""
        with self._lock:
            return dict(self.adapters.items())

    def get(self, name: str) -> InputAdapter:
        """The adapter ``name``.

        Raises:
            UnknownAdapterError: not loaded.
        """
        if name not in self:
            raise UnknownAdapterError(
                f"No input-level adapter named {name!r}. Loaded: {format_choices(self.names)}."
            )
        return self.adapters[name]

    def check_new_name(self, name: str) -> None:
        """Raise :class:`AdapterExistsError` if an input-level adapter is named ``name``."""
        if name in self:
            raise AdapterExistsError(
                f"An input-level adapter named {name!r} is already loaded. Loaded input-level adapters: "
                f"{format_choices(self.names)}. Pick another adapter_name or delete_adapter({name!r}) first."
            )

    def build(self, spec: Any, config: InputAdapterConfig, base_model: nn.Module) -> InputAdapter:
        """Build (not install) an adapter of the type ``spec`` for ``base_model``, checking its config.

        Raises:
            AdapterConfigError: the config is not of the type's config class, or invalid.
        """
        if not isinstance(config, spec.config_class):
            raise AdapterConfigError(
                f"Input adapter type {spec.name!r} takes a {spec.config_class.__name__}, got "
                f"{type(config).__name__}."
            )
        config.validate()
        adapter = spec.adapter_class(config, base_model)
        if not isinstance(adapter, InputAdapter):
            raise AdapterConfigError(
                f"Input adapter type {spec.name!r} built a {type(adapter).__name__}, not a "
                f"moa.adapters.input_level.InputAdapter. Fix its adapter_class."
            )
        limit = getattr(getattr(base_model, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and config.num_virtual_tokens >= limit:
            raise AdapterShapeError(
                f"num_virtual_tokens = {config.num_virtual_tokens} leaves no room for a token in this base's "
                f"context of {limit} positions. Use fewer virtual tokens."
            )
        return adapter

    def install(self, name: str, adapter: InputAdapter, device: Any, trainable: bool, training: bool) -> None:
        """Add ``adapter`` as ``name`` (the caller has checked the name against every adapter).

        Args:
            name: New adapter name.
            adapter: The built adapter.
            device: Where the base's parameters are.
            trainable: Whether its parameters require gradients.
            training: The base's mode (a new module starts in training mode).
        """
        adapter.to(device=device)
        adapter.requires_grad_(trainable)
        adapter.train(training)
        with self._lock:
            self.adapters[name] = adapter
        logger.info("Input-level adapter %r (%s) ready.", name, type(adapter).__name__)

    def remove(self, name: str) -> InputAdapterConfig:
        """Remove ``name``; returns its config (running calls keep their snapshot)."""
        with self._lock:
            adapter = self.get(name)
            del self.adapters[name]
        return adapter.config


__all__ = ["InputAdapterSet"]
