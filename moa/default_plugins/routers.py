"""Built-in plugin: the fixed router and the learned gate."""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import RouterSpec


@hookimpl
def moa_routers() -> list[RouterSpec]:
    """Provide the ``"fixed"`` router and the ``"learned_gate"``.

    Returns:
        :class:`RouterSpec` records for :class:`moa.routing.fixed.FixedRouter` and
        :class:`moa.routing.learned_gate.LearnedGate`.
    """
    from moa.routing.fixed import FixedRouter
    from moa.routing.learned_gate import LearnedGate

    return [
        RouterSpec(
            name="fixed",
            router_class=FixedRouter,
            description="The same adapter or weighted mixture for every request.",
        ),
        RouterSpec(
            name="learned_gate",
            router_class=LearnedGate,
            description="Trained head on the base's hidden states at one layer; top-k mixture per request or token.",
        ),
    ]
