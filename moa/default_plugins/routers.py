"""Built-in plugin: the routers that need no training."""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import RouterSpec


@hookimpl
def moa_routers() -> list[RouterSpec]:
    """Provide the ``"fixed"`` router.

    Returns:
        One :class:`RouterSpec` for :class:`moa.routing.fixed.FixedRouter`.
    """
    from moa.routing.fixed import FixedRouter

    return [
        RouterSpec(
            name="fixed",
            router_class=FixedRouter,
            description="The same adapter or weighted mixture for every request.",
        )
    ]
