"""moa-router-embedding: route by cosine similarity of the prompt's mean hidden state to adapter centroids.

Example::

    from moa_router_embedding import EmbeddingRouter

    router = EmbeddingRouter(hidden_layer=2, top_k=1).fit(model, {"sql": [...], "code": [...]})
    model.set_router(router)
    router.save("routers/embedding")     # router_config.json + router.safetensors
"""

from moa_router_embedding.router import EmbeddingRouter, masked_mean

__version__ = "0.1.0"

__all__ = ["EmbeddingRouter", "__version__", "masked_mean"]
