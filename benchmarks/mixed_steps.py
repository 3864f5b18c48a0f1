"""Mixed steps on and off: the engine under closed-loop clients, with no HTTP in between.

``--clients`` threads (default 16) each submit the next of ``--requests`` (default 64) of the
shipped adapters' chat prompts straight to an in-process :class:`~moa.serve.engine.Engine`
(mixed traffic: adapters, exact mixtures, ``auto``; greedy, up to 32 new tokens ending at
EOS) and wait for its answer before taking the next, so requests keep arriving while rows
run, as under ``serve_load.py``'s 16 HTTP clients. Variants, rounds interleaved, fp32:

* ``mixed steps``: a request admitted while rows run is prefilled inside the next decode
  step's forward (:mod:`moa.serve.mixed_step`, the default);
* ``separate prefill``: it is prefilled in a forward of its own first (``mixed_steps=False``).

Reports tokens/s per round and the median ratio, the forwards each variant ran, and how many
answers are the same in both.

Run: ``.venv/bin/python benchmarks/mixed_steps.py [--rounds 2] [--requests 64] [--clients 16]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import chat_ids, load_model, run_clients, workload  # noqa: E402

from moa.serve.engine import Engine  # noqa: E402
from moa.serve.openmp import release_idle_openmp_threads  # noqa: E402
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "mixed_steps.json"
VARIANTS = {"mixed steps": True, "separate prefill": False}


def closed_loop(model: Any, requests: list[GenerationRequest], clients: int, mixed_steps: bool) -> dict[str, Any]:
    """Serve ``requests`` from ``clients`` threads; tokens/s, answers and engine counters."""
    engine = Engine(model, max_batch_size=32, max_queue=256, mixed_steps=mixed_steps)
    engine.start()
    answers: list[list[int] | None] = [None] * len(requests)
    cursor = iter(range(len(requests)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                index = next(cursor, None)
            if index is None:
                return
            answers[index] = engine.submit(requests[index]).wait(600).token_ids

    seconds = run_clients(client, clients)
    stats = engine.stats()
    engine.shutdown()
    tokens = sum(len(a) for a in answers if a is not None)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "answers": answers,
            "steps": stats["steps"], "prefill_forwards": stats["prefill_forwards"],
            "mixed_steps": stats["mixed_steps"], "engine_busy_share": stats["busy_seconds"] / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("fp32")
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0)
    requests = [GenerationRequest(f"r{i}", chat_ids(model, r["prompt"]),
                                  RowRouting.routed() if r["auto"] else RowRouting(r["mixture"]), params)
                for i, r in enumerate(workload(model, args.requests, mixed=True))]
    release_idle_openmp_threads()  # the engines' threads compute, not this one (moa.serve.openmp)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds):
        for name, mixed in VARIANTS.items():
            run = closed_loop(model, requests, args.clients, mixed)
            runs[name].append(run)
            print(f"round {round_index + 1} {name:<17} {run['tokens_per_s']:6.1f} tok/s  ({run['tokens']} tokens in "
                  f"{run['seconds']:.1f} s; {run['steps']} decode steps, {run['prefill_forwards']} prefill forwards, "
                  f"{run['mixed_steps']} of them mixed; engine busy {run['engine_busy_share']:.0%} of the time)", flush=True)
    medians = {name: statistics.median(r["tokens_per_s"] for r in rs) for name, rs in runs.items()}
    ratio = medians["mixed steps"] / medians["separate prefill"]
    first = {name: rs[0]["answers"] for name, rs in runs.items()}
    same = sum(a == b for a, b in zip(first["mixed steps"], first["separate prefill"], strict=True))
    print(f"median tok/s: mixed steps {medians['mixed steps']:.1f}, separate prefill {medians['separate prefill']:.1f}; "
          f"ratio {ratio:.3f}; same answers {same}/{len(requests)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "clients": args.clients, "requests": args.requests, "new_tokens": args.new_tokens, "threads": args.threads,
        "runs": {name: [{k: v for k, v in r.items() if k != "answers"} for r in rs] for name, rs in runs.items()},
        "median_tokens_per_s": medians, "mixed_over_separate": round(ratio, 3), "same_answers": same,
    }, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
