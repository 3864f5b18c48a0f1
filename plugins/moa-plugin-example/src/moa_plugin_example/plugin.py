"""The plugin module named by this package's ``moa`` entry point.

It uses only moa's public plugin API: ``moa.hookspecs.hookimpl``,
``moa.plugin.records.RouterSpec`` and the public names of ``moa.routing``.
"""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import RouterSpec
from moa.routing import Router, RoutingDecision, RoutingRequest


class RoundRobinRouter(Router):
    """Send row ``i`` of a batch to adapter ``adapter_names[(start + i) % n]`` with weight 1.

    A sequence-level router: it decides once per request, so generation reuses the
    decision for every new token. With no adapters loaded every row runs the base model.

    Args:
        start: Offset of the first row's adapter in the model's adapter list.

    Example::

        model.set_router(moa.get_router("round_robin")())
    """

    name = "round_robin"
    level = "sequence"

    def __init__(self, start: int = 0) -> None:
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"RoundRobinRouter(start={start!r}): start must be an int >= 0.")
        self.start = start

    def route(self, request: RoutingRequest) -> RoutingDecision:
        """One adapter per row, cycling through ``request.adapter_names``."""
        names = list(request.adapter_names)
        rows = int(request.input_ids.shape[0])
        if not names:
            return RoutingDecision.from_mixtures([None] * rows, names)
        mixtures = [{names[(self.start + i) % len(names)]: 1.0} for i in range(rows)]
        return RoutingDecision.from_mixtures(mixtures, names)


@hookimpl
def moa_routers() -> list[RouterSpec]:
    """Provide the ``"round_robin"`` router."""
    return [
        RouterSpec(
            name="round_robin",
            router_class=RoundRobinRouter,
            description="Row i uses adapter i mod n with weight 1 (example plugin).",
        )
    ]
