"""Which exact form of ``x @ ΔW.T`` is faster for LoHa and LoKr layers, on the CPU.

For each layer shape of the tiny test base and of moa's default base (SmolLM2-135M) and for
a few numbers of rows ``n`` (1 = one decode step of one row, up to a prefill), it times:

* LoHa: ``dense`` (build ``ΔW = (w1a w1b) ⊙ (w2a w2b)``, then ``x ΔWᵀ``, PEFT's forward) against
  ``factored`` (the rank-``r²`` form, never building ``ΔW``), and reports the form that
  ``moa_lycoris.loha.factored_is_cheaper`` picks;
* LoKr: ``dense`` (build ``kron(w1, w2)``, then ``x ΔWᵀ``) against ``kron`` (``w1 X w2ᵀ`` per
  row), the factors formed from ``r``-rank products as PEFT's rules store them.

Each entry is the median of repeated forward calls (no autograd), in microseconds, on one
thread. Prints a table; ``--json PATH`` also writes the rows. Run::

    python plugins/moa-lycoris/benchmarks/delta_forms.py [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from moa_lycoris.loha import factored_is_cheaper, hadamard_apply_dense, hadamard_apply_factored
from moa_lycoris.lokr import factorization, kron_apply_dense, kron_apply_factored, kron_is_cheaper

#: (label, H_out, H_in): the distinct linear shapes of each base ("between": two square layers
#: between the two bases, where the faster form changes).
SHAPES = {
    "tiny": [("q/o", 64, 64), ("k/v", 32, 64), ("gate/up", 128, 64), ("down", 64, 128)],
    "between": [("square", 128, 128), ("square", 256, 256)],
    "default": [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)],
}
ROWS = (1, 8, 64, 512)


def median_us(function: Callable[[], torch.Tensor], budget_s: float = 0.15) -> float:
    """Median wall time of ``function()`` in microseconds, over calls filling about ``budget_s``."""
    function()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 2000):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def loha_row(base: str, label: str, out_f: int, in_f: int, rows: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(0)
    w1a, w2a = (torch.randn(out_f, rank, generator=g) for _ in range(2))
    w1b, w2b = (torch.randn(rank, in_f, generator=g) for _ in range(2))
    x = torch.randn(rows, in_f, generator=g)
    dense = median_us(lambda: hadamard_apply_dense(x, w1a, w1b, w2a, w2b, 0.5))
    factored = median_us(lambda: hadamard_apply_factored(x, w1a, w1b, w2a, w2b, 0.5))
    picked = "factored" if factored_is_cheaper(rows, rank, in_f, out_f) else "dense"
    return dict(type="loha", base=base, shape=label, out=out_f, inp=in_f, rank=rank, rows=rows,
                dense_us=dense, other_us=factored, other="factored", picked=picked)


def lokr_row(base: str, label: str, out_f: int, in_f: int, rows: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(0)
    (a, b), (c, d) = factorization(out_f), factorization(in_f)
    w1 = torch.randn(a, c, generator=g)
    full_w2 = not rank < max(b, d) / 2  # PEFT's rule (decompose_both off)
    w2a, w2b = torch.randn(b, rank, generator=g), torch.randn(rank, d, generator=g)
    w2_full = torch.randn(b, d, generator=g)
    x = torch.randn(rows, in_f, generator=g)

    def w2() -> torch.Tensor:
        return w2_full if full_w2 else w2a @ w2b

    dense = median_us(lambda: kron_apply_dense(x, w1, w2(), 0.5))
    kron = median_us(lambda: kron_apply_factored(x, w1, w2(), 0.5))
    return dict(type="lokr", base=base, shape=label, out=out_f, inp=in_f, rank=rank, rows=rows,
                dense_us=dense, other_us=kron, other="kron",
                picked="kron" if kron_is_cheaper(in_f, out_f) else "dense")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8, help="r of both types (PEFT's default: 8)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with torch.no_grad():
        for base, shapes in SHAPES.items():
            for label, out_f, in_f in shapes:
                for rows in ROWS:
                    results.append(loha_row(base, label, out_f, in_f, rows, args.rank))
                    results.append(lokr_row(base, label, out_f, in_f, rows, args.rank))
    print(f"torch {torch.__version__}, {args.threads} thread(s), r={args.rank}; median microseconds per call")
    print(f"{'type':5} {'base':8} {'shape':8} {'out x in':>11} {'rows':>5} {'dense':>9} {'other':>9} "
          f"{'form':>9} {'speed-up':>8} {'picked':>9}")
    for r in results:
        print(f"{r['type']:5} {r['base']:8} {r['shape']:8} {r['out']:>5}x{r['inp']:<5} {r['rows']:>5} "
              f"{r['dense_us']:>9.1f} {r['other_us']:>9.1f} {r['other']:>9} "
              f"{r['dense_us'] / r['other_us']:>7.2f}x {r['picked']:>9}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"torch": torch.__version__, "threads": args.threads, "rank": args.rank,
                       "rows": results}, handle, indent=1)


if __name__ == "__main__":
    main()
