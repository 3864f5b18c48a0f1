"""What the ``"model"`` field of a request means: the base, an adapter, ``base:adapter``, ``auto``.

``model`` names

* the served base (``--served-model-name``): no adapter;
* an adapter name, or ``<base>:<adapter>``: that adapter alone;
* ``auto``: the model's router decides from the prompt (400 when no router is set).

moa's extension ``adapter_weights: {adapter: weight}`` overrides the adapter ``model``
names with that exact mixture (``model`` must still be valid; ``{}`` means the base).
Unknown names answer 404 listing the choices. Adapter names never contain ``:`` (the
model refuses them), so ``base:adapter`` is unambiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moa.serve.protocol import model_card
from moa.serve.requests import AUTO, BadRequestError, RowRouting, UnknownModelError


@dataclass(frozen=True)
class ResolvedModel:
    """A request's ``model`` (+ ``adapter_weights``) resolved.

    Attributes:
        routing: What the engine applies.
        adapters: The adapters that must be resident before submitting.
        label: The metrics label of the requested model (the base name, an adapter, ``auto``).
    """

    routing: RowRouting
    adapters: tuple[str, ...]
    label: str


class ModelNames:
    """Resolves ``model`` names against the served base, the adapter cache and the router.

    Args:
        served_model_name: The base's name in the API.
        model: The served :class:`~moa.MixtureModel` (for ``router``).
        cache: The :class:`~moa.serve.adapter_cache.AdapterCache` (known adapters).
    """

    def __init__(self, served_model_name: str, model: Any, cache: Any) -> None:
        self.served_model_name = served_model_name
        self.model = model
        self.cache = cache

    @property
    def has_router(self) -> bool:
        """Whether ``auto`` is served."""
        return getattr(self.model, "router", None) is not None

    def choices(self) -> list[str]:
        """Every valid ``model`` value (``base:adapter`` forms aside)."""
        return [self.served_model_name, *([AUTO] if self.has_router else []), *self.cache.registered()]

    def _unknown(self, what: str, name: str) -> UnknownModelError:
        return UnknownModelError(
            f"The {what} {name!r} does not exist. Choices: {', '.join(self.choices())} "
            f"(or '{self.served_model_name}:<adapter>'). See GET /v1/models."
        )

    def _adapter(self, name: str) -> str:
        if not self.cache.known(name):
            raise self._unknown("model", name)
        return name

    def resolve(self, model: str, adapter_weights: Mapping[str, float] | None = None) -> ResolvedModel:
        """The routing a request asks for.

        Raises:
            UnknownModelError: an unknown model or adapter (404, listing the choices).
            BadRequestError: ``auto`` without a router; an all-zero mixture.
        """
        if model == self.served_model_name:
            routing, label = RowRouting.base(), model
        elif model == AUTO:
            if not self.has_router:
                raise BadRequestError(
                    "model 'auto' needs a router, and this server has none (started with --no-router?). "
                    f"Name an adapter or the base instead: {', '.join(self.choices())}."
                )
            routing, label = RowRouting.routed(), AUTO
        elif ":" in model:
            base, _, adapter = model.partition(":")
            if base != self.served_model_name:
                raise self._unknown("base model", base)
            routing, label = RowRouting.adapter(self._adapter(adapter)), adapter
        else:
            routing, label = RowRouting.adapter(self._adapter(model)), model
        if adapter_weights is not None:
            unknown = [n for n in adapter_weights if not self.cache.known(n)]
            if unknown:
                raise UnknownModelError(
                    f"adapter_weights names {unknown}, which are not served. Adapters: "
                    f"{', '.join(self.cache.registered()) or '(none)'}."
                )
            mixture = {n: float(w) for n, w in adapter_weights.items() if w > 0}
            if adapter_weights and not mixture:
                raise BadRequestError(
                    f"adapter_weights {dict(adapter_weights)} has no positive weight; give at least one "
                    f"weight > 0, or {{}} for the base alone."
                )
            routing = RowRouting(mixture)
        return ResolvedModel(routing, routing.adapters(), label)

    def cards(self) -> list[dict[str, Any]]:
        """``GET /v1/models``'s ``data``: the base, ``auto`` (with a router), each adapter."""
        base = self.served_model_name
        cards = [model_card(base)]
        if self.has_router:
            cards.append(model_card(AUTO, parent=base, root=base))
        for name in self.cache.registered():
            source = self.cache.source(name)
            extra = {"moa": {"resident": self.cache.record(name) is not None, "source": source}}
            cards.append(model_card(name, parent=base, root=source or name, **extra))
        return cards
