"""The fixed router: the same mixture for every request (the built-in, no training)."""

from __future__ import annotations

from collections.abc import Mapping

from moa.routing.decision import RoutingDecision
from moa.routing.router import Router, RoutingRequest


class FixedRouter(Router):
    """Send every request to the same adapter or weighted mixture.

    Args:
        mixture: An adapter name (weight 1) or a ``{name: weight}`` dict.

    Example::

        model.set_router(moa.get_router("fixed")({"sql": 0.7, "code": 0.3}))
    """

    name = "fixed"

    def __init__(self, mixture: str | Mapping[str, float]) -> None:
        self.mixture = {mixture: 1.0} if isinstance(mixture, str) else dict(mixture)

    def route(self, request: RoutingRequest) -> RoutingDecision:
        """The same mixture for every row of ``request``."""
        rows = int(request.input_ids.shape[0])
        return RoutingDecision.from_mixtures([self.mixture] * rows, request.adapter_names)
