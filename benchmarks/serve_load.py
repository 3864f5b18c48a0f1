"""``moa serve`` under load: continuous batching vs static batches vs one request at a time.

All in one run, on the default base with the five shipped adapters and the shipped gate,
over the shipped adapters' real test prompts (chat template, greedy, up to ``--new-tokens`` new
tokens; each answer ends at its EOS, so answers differ in length as in real traffic —
``--fixed-length`` masks EOS instead, as ``min_new_tokens`` / vLLM's ``min_tokens`` do, so
every request costs the same). Throughput counts the tokens actually generated:

* ``serve mixed C``: C concurrent clients over HTTP (``openai`` client) against ``moa
  serve``'s app; requests cycle through the five adapters, exact mixtures and ``auto``.
* ``serve single C``: the same, every request on one adapter (mixed-traffic cost).
* ``serve mixed 16, --separate-prefill``: requests that arrive while others decode are
  prefilled in forwards of their own instead of inside the decode step
  (:mod:`moa.serve.mixed_step`), the engine before mixed steps.
* ``serve deterministic 16``: ``--deterministic`` (each row decoded alone).
* ``static batches of 16``: ``model.generate`` on batches of 16 requests (left padding,
  per-row ``adapter_weights``), each batch waiting for its longest row.
* ``one at a time, 16 clients``: a plain FastAPI server that runs ``generate`` for one
  request at a time under a lock (what app code does without moa serve; it names the
  adapter per call rather than ``set_adapter``, which a set router would override); and
  the same with every ``generate`` on one dedicated thread (``1 compute thread``).

Torch work on this (main) thread between configurations is followed by
``release_idle_openmp_threads()`` (see :mod:`moa.serve.openmp`), so no configuration pays for
an idle OpenMP pool another one left behind.

Reports tokens/s and p50/p99 request latency per configuration, and how many greedy answers
under concurrent load equal the same request served alone (``model.generate``, batch 1).
Writes JSON to ``benchmarks/results/serve_load.json``.

Run: ``.venv/bin/python benchmarks/serve_load.py [--precision fp32|nf4] [--clients 1 4 16 32]``
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from moa.serve.openmp import release_idle_openmp_threads

RESULTS = Path(__file__).resolve().parent / "results" / "serve_load.json"


SKIPPABLE = ("single", "separate-prefill", "deterministic", "one-at-a-time")
#: ratio name -> (numerator, denominator) configurations
RATIOS = {
    "serve16_over_static16": ("serve mixed 16", "static batches of 16"),
    "serve16_over_one_at_a_time": ("serve mixed 16", "one at a time, 16 clients"),
    "serve16_over_one_at_a_time_1_thread": ("serve mixed 16", "one at a time, 1 compute thread"),
    "mixed_over_single_16": ("serve mixed 16", "serve single-adapter 16"),
    "deterministic_over_batched_16": ("serve --deterministic 16", "serve mixed 16"),
    "mixed_steps_over_separate_prefill_16": ("serve mixed 16", "serve mixed 16, --separate-prefill"),
}

def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_model(precision: str) -> Any:
    import moa
    from moa.eval.assets import load_adapters, router_dir, shipped_adapters_dir
    from moa.routing.learned_gate import LearnedGate

    model = moa.MixtureModel.from_pretrained("default", quantization=None if precision == "fp32" else "nf4")
    load_adapters(model, shipped_adapters_dir())
    model.set_router(LearnedGate.load(router_dir(shipped_adapters_dir())))
    return model


def workload(model: Any, count: int, mixed: bool) -> list[dict[str, Any]]:
    """``count`` requests over the shipped test prompts: {prompt, model, extra, mixture, auto}."""
    from moa.data import DOMAINS, load_split

    tests = {d: load_split(d, "test") for d in DOMAINS}
    requests = []
    for i in range(count):
        domain = DOMAINS[i % len(DOMAINS)]
        prompt = tests[domain][i // len(DOMAINS)].prompt
        kind = i % 4 if mixed else 0
        if kind == 0 or not mixed:
            name = domain if mixed else "sql"
            requests.append({"prompt": prompt, "model": name, "extra": None, "mixture": {name: 1.0}, "auto": False})
        elif kind == 1:
            mix = {domain: 0.7, DOMAINS[(i + 1) % len(DOMAINS)]: 0.3}
            requests.append({"prompt": prompt, "model": "base", "extra": {"adapter_weights": mix},
                             "mixture": mix, "auto": False})
        elif kind == 2:
            requests.append({"prompt": prompt, "model": "auto", "extra": None, "mixture": None, "auto": True})
        else:
            requests.append({"prompt": prompt, "model": domain, "extra": None, "mixture": {domain: 1.0}, "auto": False})
    return requests


def chat_ids(model: Any, prompt: str) -> list[int]:
    from moa.serve.prompts import chat_prompt_ids

    return chat_prompt_ids(model, [{"role": "user", "content": prompt}])


def summarize(name: str, latencies: list[float], tokens: int, seconds: float) -> dict[str, Any]:
    latencies = sorted(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    row = {"config": name, "requests": len(latencies), "tokens": tokens, "seconds": round(seconds, 2),
           "tokens_per_s": round(tokens / seconds, 2), "p50_s": round(statistics.median(latencies), 2),
           "p99_s": round(p99, 2)}
    print(f"{name:<36} {row['tokens_per_s']:>8.1f} tok/s   p50 {row['p50_s']:>6.2f} s   p99 {row['p99_s']:>6.2f} s   "
          f"({len(latencies)} requests, {tokens} tokens)", flush=True)
    return row


def drive(base_url: str, requests: list[dict[str, Any]], clients: int, new_tokens: int,
          min_tokens: int) -> tuple[list, list, float]:
    """Send ``requests`` from ``clients`` threads (each takes the next one); chat, greedy."""
    import openai

    texts: list[Any] = [None] * len(requests)
    latencies: list[float] = []
    lock = threading.Lock()
    cursor = iter(range(len(requests)))

    def worker() -> None:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0, timeout=3600)
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            req = requests[i]
            start = time.perf_counter()
            response = client.chat.completions.create(
                model=req["model"], messages=[{"role": "user", "content": req["prompt"]}], max_tokens=new_tokens,
                temperature=0, extra_body={**(req["extra"] or {}), "min_tokens": min_tokens})
            with lock:
                latencies.append(time.perf_counter() - start)
                texts[i] = (response.choices[0].message.content, response.usage.completion_tokens,
                            response.model_extra["moa"]["routing"])

    return texts, latencies, run_clients(worker, clients)


def run_clients(worker: Any, clients: int) -> float:
    """Run ``worker`` on ``clients`` threads at once; the seconds until the last one ends."""
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def serve(model: Any, deterministic: bool, max_batch_size: int, mixed_steps: bool = True) -> tuple[Any, Any, Any, str]:
    from moa.serve.adapter_cache import AdapterCache
    from moa.serve.app import create_app
    from moa.serve.engine import Engine

    engine = Engine(model, max_batch_size=max_batch_size, max_queue=256, deterministic=deterministic,
                    mixed_steps=mixed_steps)
    cache = AdapterCache(engine, model, max_loras=None, allow_runtime_loading=False, pinned=set(model.adapter_names))
    engine.start()
    server, thread, url = start_uvicorn(create_app(engine, model, cache, served_model_name="base"))
    return engine, server, thread, url


def start_uvicorn(app: Any) -> tuple[Any, threading.Thread, str]:
    """Serve ``app`` on a free port of 127.0.0.1 in a thread; wait until it listens."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def one_at_a_time_server(model: Any, one_compute_thread: bool = False) -> tuple[Any, Any, str]:
    """What app code does without moa serve: a lock, then ``generate`` for one request.

    By default the route is synchronous, so FastAPI runs each request on a thread of its
    pool and torch starts an OpenMP pool on each of those threads (which slows them all on a
    small CPU, see :mod:`moa.serve.openmp`). ``one_compute_thread=True`` runs every
    ``generate`` on one dedicated thread instead: the same server at its best.
    """
    import asyncio
    import concurrent.futures

    from fastapi import FastAPI

    app = FastAPI()
    lock = threading.Lock()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1) if one_compute_thread else None

    def answer(body: dict) -> dict:
        ids = torch.tensor([chat_ids(model, body["messages"][-1]["content"])])
        weights = body.get("adapter_weights")
        name = body["model"]
        if weights:
            kwargs = {"adapter_weights": [weights]}
        else:
            kwargs = {"adapter_names": [name if name in model.adapter_names or name == "auto" else None]}
        with lock, torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=body["max_tokens"],
                                 do_sample=False, min_new_tokens=body.get("min_tokens", 0), **kwargs)
        new = out[0, ids.shape[1]:]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": model.tokenizer.decode(new)}}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new),
                          "total_tokens": ids.shape[1] + len(new)}, "moa": {"routing": {}}}

    if executor is None:
        app.post("/v1/chat/completions")(answer)  # a sync route: FastAPI runs it in its thread pool
    else:
        @app.post("/v1/chat/completions")
        async def chat(body: dict) -> dict:
            return await asyncio.get_running_loop().run_in_executor(executor, answer, body)

    return start_uvicorn(app)


def answer_length(row: torch.Tensor, eos: set[int]) -> int:
    """Tokens a row really generated: up to and including its first EOS."""
    for i, token in enumerate(row.tolist()):
        if token in eos:
            return i + 1
    return len(row)


def static_batches(model: Any, requests: list[dict[str, Any]], new_tokens: int, batch: int,
                   min_tokens: int) -> dict[str, Any]:
    """``model.generate`` on fixed batches (left padding); every row waits for its batch."""
    tokenizer = model.tokenizer
    tokenizer.padding_side = "left"
    latencies, tokens = [], 0
    start = time.perf_counter()
    for first in range(0, len(requests), batch):
        group = requests[first: first + batch]
        rows = [chat_ids(model, r["prompt"]) for r in group]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        weights = ["auto" if r["auto"] else r["mixture"] for r in group]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, adapter_weights=weights, max_new_tokens=new_tokens,
                                 min_new_tokens=min_tokens, do_sample=False, pad_token_id=pad)
        eos = set(eos_ids(model))
        tokens += sum(answer_length(row, eos) for row in out[:, width:])
        latencies += [time.perf_counter() - start] * len(group)
    return summarize(f"static batches of {batch}", latencies, tokens, time.perf_counter() - start)


def eos_ids(model: Any) -> list[int]:
    eos = model.base_model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [model.tokenizer.eos_token_id])


def alone_answers(model: Any, requests: list[dict[str, Any]], new_tokens: int, min_tokens: int) -> list[str]:
    answers = []
    for r in requests:
        ids = torch.tensor([chat_ids(model, r["prompt"])])
        kwargs = {"adapter_names": ["auto"]} if r["auto"] else {"adapter_weights": [r["mixture"]]}
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=min_tokens, do_sample=False, **kwargs)
        answers.append(model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=("fp32", "nf4"), default="fp32")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--fixed-length", action="store_true",
                        help="mask EOS so every answer has exactly --new-tokens tokens")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests per client (at least 16, at most 64 per configuration); more "
                             "weighs the steady state over the ramp-up and the drain at the end")
    parser.add_argument("--skip", nargs="+", default=[], choices=SKIPPABLE,
                        help="configurations not to run (the ratios that need them are left out)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.precision)
    min_tokens = args.new_tokens if args.fixed_length else 0
    rows: list[dict[str, Any]] = []
    n = lambda clients: min(64, max(16, args.requests_per_client * clients))  # noqa: E731 - per configuration
    print(f"moa serve load, {args.precision}, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")

    engine, server, thread, url = serve(model, deterministic=False, max_batch_size=32)
    agreement = None
    for clients in args.clients:
        requests = workload(model, n(clients), mixed=True)
        busy_before = engine.stats()["busy_seconds"]
        texts, latencies, seconds = drive(url, requests, clients, args.new_tokens, min_tokens)
        rows.append(summarize(f"serve mixed {clients}", latencies, sum(t[1] for t in texts), seconds))
        rows[-1]["engine_busy_share"] = round((engine.stats()["busy_seconds"] - busy_before) / seconds, 3)
        print(f"  engine busy {rows[-1]['engine_busy_share']:.0%} of the time (working, not waiting for requests)")
        if clients == 16:
            alone = alone_answers(model, requests, args.new_tokens, min_tokens)
            same = sum(t[0] == a for t, a in zip(texts, alone))
            agreement = {"requests": len(alone), "equal_to_alone": same}
            release_idle_openmp_threads()  # alone_answers ran on this thread (moa.serve.openmp)
            print(f"  greedy answers under 16-client load equal to the request alone: {same}/{len(alone)}")
    if "single" not in args.skip:
        requests = workload(model, n(16), mixed=False)
        texts, latencies, seconds = drive(url, requests, 16, args.new_tokens, min_tokens)
        rows.append(summarize("serve single-adapter 16", latencies, sum(t[1] for t in texts), seconds))
    server.should_exit = True
    thread.join()
    engine.shutdown()

    for name, engine_args in (("serve mixed 16, --separate-prefill", {"mixed_steps": False}),
                              ("serve --deterministic 16", {"deterministic": True})):
        if ("separate-prefill" if "prefill" in name else "deterministic") in args.skip:
            continue
        engine, server, thread, url = serve(model, max_batch_size=32, **{"deterministic": False, **engine_args})
        requests = workload(model, n(16), mixed=True)
        texts, latencies, seconds = drive(url, requests, 16, args.new_tokens, min_tokens)
        rows.append(summarize(name, latencies, sum(t[1] for t in texts), seconds))
        server.should_exit = True
        thread.join()
        engine.shutdown()

    rows.append(static_batches(model, workload(model, n(16), mixed=True), args.new_tokens, 16, min_tokens))

    # the dedicated-thread variant first: the sync one leaves an OpenMP pool on each of its threads
    for one_compute_thread, name in ((True, "one at a time, 1 compute thread"),
                                     (False, "one at a time, 16 clients")):
        if "one-at-a-time" in args.skip:
            break
        release_idle_openmp_threads()  # the static batches ran on this thread
        server, thread, url = one_at_a_time_server(model, one_compute_thread)
        requests = workload(model, 16, mixed=True)
        texts, latencies, seconds = drive(url, requests, 16, args.new_tokens, min_tokens)
        rows.append(summarize(name, latencies, sum(t[1] for t in texts), seconds))
        server.should_exit = True
        thread.join()

    by = {r["config"]: r["tokens_per_s"] for r in rows}
    ratios = {}
    if "serve mixed 16" in by:
        for key, (numerator, denominator) in RATIOS.items():
            if numerator in by and denominator in by:
                ratios[key] = round(by[numerator] / by[denominator], 3)
        print("ratios:", ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"precision": args.precision, "new_tokens": args.new_tokens,
                                    "fixed_length": args.fixed_length,
                                    "requests_per_client": args.requests_per_client,
                                    "threads": torch.get_num_threads(), "machine": platform.platform(),
                                    "rows": rows, "ratios": ratios, "greedy_agreement_16": agreement}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
