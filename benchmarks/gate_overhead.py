"""What the learned gate adds to a forward: routed in-pass vs the same decisions given explicitly.

On the NF4 default base with the five demo adapters and the learned gate (the shipped ones
under ``moa/demo_adapters``, or seeded random ones with ``--random``), a mixed batch of
real prompts from every domain (chat template, left padding) is timed two ways:

* ``router``: ``model.set_router(gate); model(**inputs)`` -- layers 0..L-1 run base-only,
  the gate pools the input of layer L, decides, and the adapters apply from layer L on;
* ``explicit``: ``model(**inputs, adapter_weights=decisions)`` with the very decisions the
  gate made (so both forwards compute exactly the same adapters; the gate stays set, and
  explicit weights override it).

Timings are interleaved (router, explicit, router, ...) in one process and the median of
the rounds is reported, so machine drift hits both alike. The gate's decisions are also
timed by themselves, inside the forward (pooling, MLP, top-k): on a noisy 2-core VM two
multi-second forwards differ by more than the gate costs, and this is the figure that
resolves it. Also times one ``generate`` of
``--new-tokens`` tokens each way (the gate decides once per request, at the prefill).
Prints a table and writes JSON to ``benchmarks/results/gate_overhead.json``.

Run: ``.venv/bin/python benchmarks/gate_overhead.py [--rounds 15] [--batch 10] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import moa
from moa.data import DOMAINS, load_split
from moa.eval.assets import load_adapters, router_dir, shipped_adapters_dir
from moa.eval.runner import RecordingRouter
from moa.routing.learned_gate import LearnedGate
from moa.routing.router import Router, RoutingRequest
from moa.data.chat import encode_prompts
from moa.train.recipes import DEMO_RECIPE
from moa.train.sft import add_training_adapter


def build(random_adapters: bool) -> tuple[moa.MixtureModel, LearnedGate]:
    """The NF4 base with five adapters and a gate (shipped, or seeded random)."""
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    shipped = shipped_adapters_dir()
    if not random_adapters and (router_dir(shipped) / "router_config.json").is_file():
        load_adapters(model, shipped)
        return model, LearnedGate.load(router_dir(shipped))
    r = DEMO_RECIPE
    for i, d in enumerate(DOMAINS):
        add_training_adapter(model, d, rank=r.rank, alpha=r.alpha, first_layer=r.first_layer,
                             projections=r.projections, seed=i)
        with torch.no_grad():
            for layer in model.adapter_layers(d).values():
                layer.lora_B.weight.normal_(std=0.01)
    torch.manual_seed(0)
    return model, LearnedGate(list(DOMAINS), model.config.hidden_size, hidden_layer=r.first_layer)


class TimedRouter(Router):
    """Delegates to ``inner`` and keeps the seconds each decision took (inside the forward)."""

    def __init__(self, inner: Router) -> None:
        self.inner, self.name, self.level, self.hidden_layer = inner, inner.name, inner.level, inner.hidden_layer
        self.seconds: list[float] = []

    def route(self, request: RoutingRequest) -> Any:
        start = time.perf_counter()
        decision = self.inner.route(request)
        self.seconds.append(time.perf_counter() - start)
        return decision


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=10, help="requests (two per domain by default)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per generate (0: time forwards only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random", action="store_true", help="seeded random adapters and gate")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gate_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, gate = build(args.random)
    per_domain = max(1, args.batch // len(DOMAINS))
    prompts = [e.prompt for d in DOMAINS for e in load_split(d, "test")[:per_domain]][: args.batch]
    inputs = encode_prompts(model.tokenizer, prompts)
    recorder = RecordingRouter(gate)
    model.set_router(recorder)
    with torch.no_grad():
        model(**inputs)
    decisions = recorder.decisions[-1]
    # The gate stays set: explicit adapter_weights override it (its layer hook returns at once).
    # Wrapped so each in-pass decision is timed too: on a noisy VM the difference of two
    # multi-second forwards cannot resolve a millisecond, the decision's own clock can.
    timed_gate = TimedRouter(gate)
    model.set_router(timed_gate)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
               pad_token_id=model.tokenizer.pad_token_id)

    def forward_router() -> None:
        with torch.no_grad():
            model(**inputs)

    def forward_explicit() -> None:
        with torch.no_grad():
            model(**inputs, adapter_weights=decisions)

    def generate_router() -> None:
        model.generate(**inputs, **gen)

    def generate_explicit() -> None:
        model.generate(**inputs, adapter_weights=decisions, **gen)

    variants = {"forward router": forward_router, "forward explicit": forward_explicit}
    if args.new_tokens > 0:
        variants |= {"generate router": generate_router, "generate explicit": generate_explicit}
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            samples[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in samples.items()}
    best = {k: min(v) for k, v in samples.items()}
    kinds = [k for k in ("forward", "generate") if f"{k} router" in samples]
    # the median is the headline; the minimum (least disturbed round) is the cross-check on a noisy VM
    overhead = {k: med[f"{k} router"] / med[f"{k} explicit"] - 1 for k in kinds}
    overhead_min = {k: best[f"{k} router"] / best[f"{k} explicit"] - 1 for k in kinds}
    width = inputs["input_ids"].shape[1]
    print(f"NF4 default base, {len(DOMAINS)} adapters r={DEMO_RECIPE.rank}, gate on layer {gate.hidden_layer}; "
          f"batch {len(prompts)} x {width} tokens; {args.rounds} interleaved rounds, median; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'variant':<20} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, values in samples.items():
        print(f"{name:<20} {1000 * med[name]:>10.1f} {1000 * min(values):>9.1f} {1000 * max(values):>9.1f}")
    decision_ms = 1000 * statistics.median(timed_gate.seconds)
    print(f"gate decision inside the forward: median {decision_ms:.2f} ms over {len(timed_gate.seconds)} decisions "
          f"= {100 * decision_ms / (1000 * med['forward explicit']):.3f} % of a forward")
    for k in kinds:
        what = f"generate ({args.new_tokens} tokens)" if k == "generate" else "forward"
        print(f"gate overhead, {what}: median {100 * overhead[k]:+.2f} %, minimum {100 * overhead_min[k]:+.2f} %")
    result = {"batch": len(prompts), "seq_len": width, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "new_tokens": args.new_tokens, "random_adapters": args.random, "hidden_layer": gate.hidden_layer,
              "median_seconds": med, "samples": samples, "overhead": overhead, "overhead_min": overhead_min,
              "decision_ms_median": decision_ms, "decisions": decisions,
              "machine": platform.platform(), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
