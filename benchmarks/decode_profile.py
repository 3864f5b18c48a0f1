"""Where a mixed decode step's time goes: torch profiler op table, base vs moa mixed-8.

Usage::

    .venv/bin/python benchmarks/decode_profile.py > benchmarks/results/decode_profile.txt

(``decode_profile_before_batched_expand.txt``: the same run before the dense strategy
batched its per-adapter expands into one GEMM.)

The setting of ``decode_step.py`` (fp32 default base, 16 rows over 8 LoRA adapters r=16 on
all 7 linear kinds, row i on adapter i % 8), but one model forward of one new token per row
over a 64-token KV cache, so nothing but the decode step is measured: the cache is prefilled
once per variant and copied before every step. Prints the median step time of each variant
(interleaved rounds), then the profiler's top ops per step for each. The profiler adds a
fixed cost per op, so its times flatter the big GEMMs and penalise the many small ops: read
the op counts and shares, and take the step times from the unprofiled rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moa  # noqa: E402
from mixed_batch import ADAPTERS, make_peft_adapters  # noqa: E402
from moa.model.base_loading import default_base_path, load_base  # noqa: E402

BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--profiled", type=int, default=5, help="profiled steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=14, help="ops listed per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_dir = default_base_path()
    names = [f"a{i}" for i in range(ADAPTERS)]
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_peft_adapters(base_dir, Path(tmp))
        model = moa.MixtureModel(load_base(base_dir, quantization=None)[0])
        for name, folder in zip(names, folders, strict=True):
            model.load_adapter(folder, adapter_name=name)
    prompt = torch.randint(100, 20000, (BATCH, 64), generator=torch.Generator().manual_seed(0))
    token = torch.randint(100, 20000, (BATCH, 1), generator=torch.Generator().manual_seed(1))
    variants = {"base": [None] * BATCH, "moa mixed-8": [names[i % ADAPTERS] for i in range(BATCH)]}
    with torch.inference_mode():
        caches = {}
        for variant, rows in variants.items():
            caches[variant] = DynamicCache()
            model(prompt, past_key_values=caches[variant], use_cache=True, adapter_names=rows)

        def step(variant: str) -> float:
            cache = copy.deepcopy(caches[variant])
            start = time.perf_counter()
            model(token, past_key_values=cache, use_cache=True, adapter_names=variants[variant])
            return time.perf_counter() - start

        times: dict[str, list[float]] = {v: [] for v in variants}
        for round_index in range(args.rounds + 2):
            for variant in variants:
                elapsed = step(variant)
                if round_index >= 2:  # two warm-up rounds
                    times[variant].append(elapsed)
        medians = {v: statistics.median(t) for v, t in times.items()}
        print(f"decode step (one forward, 16 rows, 64-token cache, fp32, {torch.get_num_threads()} threads), "
              f"median of {args.rounds}:")
        for variant, seconds in medians.items():
            print(f"  {variant:<12} {1000 * seconds:7.1f} ms   {seconds / medians['base']:.3f}x base")
        for variant, rows in variants.items():
            copies = [copy.deepcopy(caches[variant]) for _ in range(args.profiled)]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for cache in copies:
                    model(token, past_key_values=cache, use_cache=True, adapter_names=rows)
            events = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                            key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events)
            print(f"\n{variant}: aten self time {total / args.profiled / 1000:.1f} ms per profiled step")
            print(f"  {'op':<48} {'ms/step':>8} {'share':>7} {'calls/step':>11} {'us/call':>8}")
            for e in events[:args.rows]:
                print(f"  {e.key:<48} {e.self_cpu_time_total / args.profiled / 1000:8.1f} "
                      f"{e.self_cpu_time_total / total:7.1%} {e.count / args.profiled:11.0f} "
                      f"{e.self_cpu_time_total / max(e.count, 1):8.1f}")


if __name__ == "__main__":
    main()
