"""The serving engine vs ``model.generate`` on the same batch: is the engine's own work as cheap?

16 of the shipped adapters' chat prompts (mixed: adapters, exact mixtures, ``auto``), each
answer exactly ``--new-tokens`` tokens (EOS masked), fp32, in one process, rounds interleaved:

* ``generate``: one left-padded batch of 16 through ``model.generate`` (per-row
  ``adapter_weights``), what a static batch costs;
* ``engine``: the same 16 requests queued while the engine is held busy, then admitted
  together (one packed prefill) and decoded in one running batch, with no HTTP in between.

Both do the same work: one prefill of the 16 prompts and ``--new-tokens - 1`` decode steps of
16 rows. So the ratio shows the engine's own overhead (packing, batch cache, per-step routing,
per-row sampling), apart from the arrival pattern and HTTP that ``serve_load.py`` adds. It
also counts how many engine answers equal ``generate``'s.

Run: ``.venv/bin/python benchmarks/engine_vs_generate.py [--rounds 3] [--new-tokens 32]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import chat_ids, load_model, workload  # noqa: E402

from moa.serve.engine import Engine  # noqa: E402
from moa.serve.openmp import release_idle_openmp_threads  # noqa: E402
from moa.serve.requests import GenerationRequest, RowRouting, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "engine_vs_generate.json"


def run_generate(model, prompts, weights, new_tokens):
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, adapter_weights=weights, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return [row.tolist() for row in out[:, width:]]


def run_engine(engine, prompts, routings, new_tokens):
    held, release = threading.Event(), threading.Event()
    blocker = threading.Thread(target=lambda: engine.call(lambda: (held.set(), release.wait(60))))
    blocker.start()
    held.wait(60)
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0)
    handles = [engine.submit(GenerationRequest(f"r{i}", prompt, routing, params))
               for i, (prompt, routing) in enumerate(zip(prompts, routings, strict=True))]
    start = time.perf_counter()
    release.set()
    blocker.join()
    answers = [h.wait(600).token_ids for h in handles]
    return answers, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("fp32")
    requests = workload(model, 16, mixed=True)
    prompts = [chat_ids(model, r["prompt"]) for r in requests]
    weights = ["auto" if r["auto"] else r["mixture"] for r in requests]
    routings = [RowRouting.routed() if r["auto"] else RowRouting(r["mixture"]) for r in requests]
    engine = Engine(model, max_batch_size=16, max_queue=64)
    engine.start()
    times: dict[str, list[float]] = {"generate": [], "engine": []}
    same = None
    for round_index in range(args.rounds + 1):  # round 0 warms up
        # one OpenMP pool at a time (moa.serve.openmp): free the engine thread's before
        # generate runs here, and this thread's before the engine runs
        engine.call(release_idle_openmp_threads)
        start = time.perf_counter()
        reference = run_generate(model, prompts, weights, args.new_tokens)
        generate_seconds = time.perf_counter() - start
        release_idle_openmp_threads()
        answers, engine_seconds = run_engine(engine, prompts, routings, args.new_tokens)
        if round_index:
            times["generate"].append(generate_seconds)
            times["engine"].append(engine_seconds)
            print(f"round {round_index}: generate {generate_seconds:.2f} s, engine {engine_seconds:.2f} s", flush=True)
        same = sum(a == r for a, r in zip(answers, reference, strict=True))
    engine.shutdown()
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["engine"] / medians["generate"]
    print(f"median: generate {medians['generate']:.2f} s, engine {medians['engine']:.2f} s, "
          f"engine/generate {ratio:.3f}; engine answers equal to generate's: {same}/16")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"new_tokens": args.new_tokens, "threads": args.threads, "seconds": times,
                                   "median_seconds": medians, "engine_over_generate": round(ratio, 3),
                                   "equal_answers": same}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
