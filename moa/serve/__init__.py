"""``moa serve``: an OpenAI-compatible server over one base and many adapters.

Modules (nothing heavy is imported here; the HTTP ones need the ``serve`` extra):

* :mod:`moa.serve.requests` — the records shared by the app and the engine;
* :mod:`moa.serve.engine` — the engine thread: continuous batching over the model;
* :mod:`moa.serve.scheduler` — what each step runs: queues, slots, token budget, prompt chunks;
* :mod:`moa.serve.model_runner` — the engine's forwards and the batch KV cache;
* :mod:`moa.serve.output` — one request's tokens, streamed text and ending;
* :mod:`moa.serve.detokenizer` — incremental detokenization;
* :mod:`moa.serve.prefix_cache` — prompt prefixes' keys/values, reused under the same routing;
* :mod:`moa.serve.admin_calls` — adapter changes run on the engine thread, with timeouts;
* :mod:`moa.serve.adapter_cache` — resident adapters, LRU eviction, just-in-time loads;
* :mod:`moa.serve.rows` — one request inside the engine: its routing, prefill progress, group;
* :mod:`moa.serve.logprobs` — log-probabilities of a row's tokens and their OpenAI shapes;
* :mod:`moa.serve.structured` — ``response_format`` (JSON) through llguidance, row by row;
* :mod:`moa.serve.protocol` — OpenAI request bodies, validated;
* :mod:`moa.serve.fields` — the request fields honoured, taken at neutral values, or refused;
* :mod:`moa.serve.responses` — OpenAI response and chunk shapes;
* :mod:`moa.serve.prompts` — prompt token ids (chat template) of a request;
* :mod:`moa.serve.model_names` — what a request's ``"model"`` means;
* :mod:`moa.serve.delivery` — JSON or Server-Sent Events back to the client;
* :mod:`moa.serve.metrics` — Prometheus metrics;
* :mod:`moa.serve.app` — the FastAPI app (:func:`~moa.serve.app.create_app`);
* :mod:`moa.serve.launch` — what ``moa serve`` and its Ray replicas share when they start;
* :mod:`moa.serve.ray_app` — ``moa serve`` on Ray Serve (the ``ray`` extra).
"""
