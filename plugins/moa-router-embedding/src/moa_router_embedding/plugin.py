"""The plugin module named by this package's ``moa`` entry point."""

from __future__ import annotations

from moa.hookspecs import hookimpl
from moa.plugin.records import RouterSpec


@hookimpl
def moa_routers() -> list[RouterSpec]:
    """Provide the ``"embedding"`` router.

    Returns:
        One :class:`RouterSpec`.
    """
    from moa_router_embedding.router import EmbeddingRouter

    return [
        RouterSpec(
            name="embedding",
            router_class=EmbeddingRouter,
            description="Cosine similarity of the mean hidden state to per-adapter centroids; top-k.",
        )
    ]
