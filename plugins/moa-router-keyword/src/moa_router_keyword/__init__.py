"""moa-router-keyword: a no-training router from keyword/regex rules to adapter weights.

Example::

    from moa_router_keyword import KeywordRouter

    router = KeywordRouter.from_keywords({"sql": ["select", "join"], "code": ["def", "import"]},
                                         default={"chat": 1.0}, tokenizer=model.tokenizer)
    model.set_router(router)
"""

from moa_router_keyword.router import KeywordRouter, KeywordRule

__version__ = "0.1.0"

__all__ = ["KeywordRouter", "KeywordRule", "__version__"]
