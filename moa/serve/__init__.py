"""``moa serve``: an OpenAI-compatible server over one base and many adapters.

Modules (nothing heavy is imported here; the HTTP ones need the ``serve`` extra):

* :mod:`moa.serve.requests` — the records shared by the app and the engine;
* :mod:`moa.serve.engine` — the engine thread: continuous batching over the model;
* :mod:`moa.serve.adapter_cache` — resident adapters, LRU eviction, just-in-time loads;
* :mod:`moa.serve.protocol` — OpenAI request bodies and response shapes;
* :mod:`moa.serve.prompts` — prompt token ids (chat template) of a request;
* :mod:`moa.serve.model_names` — what a request's ``"model"`` means;
* :mod:`moa.serve.delivery` — JSON or Server-Sent Events back to the client;
* :mod:`moa.serve.metrics` — Prometheus metrics;
* :mod:`moa.serve.app` — the FastAPI app (:func:`~moa.serve.app.create_app`).
"""
