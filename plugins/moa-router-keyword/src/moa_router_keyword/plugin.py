"""The plugin module named by this package's ``moa`` entry point."""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import RouterSpec


@hookimpl
def moa_routers() -> list[RouterSpec]:
    """Provide the ``"keyword"`` router.

    Returns:
        One :class:`RouterSpec`.
    """
    from moa_router_keyword.router import KeywordRouter

    return [
        RouterSpec(
            name="keyword",
            router_class=KeywordRouter,
            description="Regex/keyword rules -> adapter weights (first match or sum); no training.",
        )
    ]
