"""Is bitsandbytes' NF4 matmul the bottleneck? ``Linear4bit`` vs a bf16 ``nn.Linear`` on CUDA.

Decides item 4 of the kernels issue: a fused NF4 dequant+matmul Triton kernel is worth
writing only if bitsandbytes' ``Linear4bit`` (NF4, double quant, bf16 compute: exactly
how moa loads the base, via :func:`moa.model.base_loading.quantize_nf4_`) is clearly
slower than it has to be where the mixture runs (decode, M <= 64). For the default base's
real layer shapes (SmolLM2-135M: q/o 576x576, k/v 576x192, gate/up 576x1536, down
1536x576; ``--shapes`` adds hidden 4096) and M = 1..4096 rows it times:

* ``bf16``: ``nn.Linear`` in bf16 (the dense baseline)
* ``nf4``: bitsandbytes ``Linear4bit`` on the same weights

and prints both, ``nf4 / bf16``, and each one's weight-read floor (weight bytes / measured
copy bandwidth; at small M the weights dominate). ``nf4 / floor`` far above 1 at M <= 64
is the room a fused kernel could win.

Timing: CUDA events around a loop over rotated copies of the layer and its input (more
than the L2 cache together, as in a real forward where every layer's weights are new),
median of ``--reps`` rounds; CUDA-graph captured where possible (device time), else eager.

Needs CUDA and bitsandbytes; refuses clearly (exit 2) without CUDA.
Run: ``python benchmarks/nf4_matmul.py [--out benchmarks/results/nf4_matmul.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SHAPES = {  # (H_in, H_out)
    "qo576": (576, 576),
    "kv576": (576, 192),
    "up576": (576, 1536),
    "down1536": (1536, 576),
    "h4096": (4096, 4096),
}
DEFAULT_SHAPES = ["qo576", "kv576", "up576", "down1536"]
RESULTS = Path(__file__).parent / "results"


def cuda_time(run: Callable[[int], object], copies: int, reps: int) -> tuple[float, str]:
    """Median seconds per call of ``run(copy_index)``; ``(seconds, "graph" | "eager")``."""
    for i in range(copies):
        run(i)
    torch.cuda.synchronize()
    replay = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(copies):
                run(i)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(copies):
                run(i)
        replay = graph.replay
    except Exception:  # noqa: BLE001 - not capturable: time eagerly
        torch.cuda.synchronize()
    loop = replay or (lambda: [run(i) for i in range(copies)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        loop()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / copies)
    return statistics.median(times), "graph" if replay else "eager"


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds, _ = cuda_time(lambda _: dst.copy_(src), 1, 50)
    return 2 * src.numel() / seconds


def nf4_copy(layer: nn.Linear) -> nn.Module:
    """``layer`` quantized exactly as moa quantizes the base (NF4, double quant, bf16 compute)."""
    from moa.model.base_loading import quantize_nf4_

    holder = nn.Sequential(nn.Linear(layer.in_features, layer.out_features, bias=False))
    holder[0].weight.data = layer.weight.data.clone()
    quantize_nf4_(holder, compute_dtype=torch.bfloat16, device="cuda")
    return holder[0]


def nf4_bytes(h_in: int, h_out: int) -> int:
    """Packed NF4 weight bytes: 4 bits per weight + one 8-bit absmax per 64 (double quant)."""
    return h_in * h_out // 2 + h_in * h_out // 64


def bench(args: argparse.Namespace) -> tuple[list[dict], dict]:
    bandwidth = copy_bandwidth()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    print(f"{torch.cuda.get_device_name(0)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, L2 {l2 / 2**20:.0f} MiB")
    print(f"{'shape':>9} {'M':>5} {'bf16 us':>8} {'nf4 us':>8} {'nf4/bf16':>8} "
          f"{'bf16 floor':>10} {'nf4 floor':>9} {'nf4/floor':>9}")
    rows = []
    for shape in args.shapes:
        h_in, h_out = SHAPES[shape]
        copies = int(min(args.max_copies, max(2, -(-4 * l2 // (2 * h_in * h_out)))))
        dense = [nn.Linear(h_in, h_out, bias=False, device="cuda", dtype=torch.bfloat16).eval() for _ in range(copies)]
        quantized = [nf4_copy(layer).eval() for layer in dense]
        for m in args.m:
            xs = [torch.randn(m, h_in, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            with torch.no_grad():
                error = float((quantized[0](xs[0]) - dense[0](xs[0])).float().norm() / dense[0](xs[0]).float().norm())
                bf16_s, bf16_mode = cuda_time(lambda i: dense[i](xs[i]), copies, args.reps)
                nf4_s, nf4_mode = cuda_time(lambda i: quantized[i](xs[i]), copies, args.reps)
            io = 2 * m * (h_in + h_out)
            floor_bf16 = (2 * h_in * h_out + io) / bandwidth
            floor_nf4 = (nf4_bytes(h_in, h_out) + io) / bandwidth
            row = {"shape": shape, "h_in": h_in, "h_out": h_out, "m": m, "copies": copies,
                   "bf16_s": bf16_s, "bf16_mode": bf16_mode, "nf4_s": nf4_s, "nf4_mode": nf4_mode,
                   "nf4_over_bf16": nf4_s / bf16_s, "bf16_floor_s": floor_bf16, "nf4_floor_s": floor_nf4,
                   "nf4_over_floor": nf4_s / floor_nf4, "nf4_relative_error": error}
            rows.append(row)
            mark = {"graph": "", "eager": "*"}
            print(f"{shape:>9} {m:>5} {bf16_s * 1e6:>7.1f}{mark[bf16_mode]} {nf4_s * 1e6:>7.1f}{mark[nf4_mode]} "
                  f"{row['nf4_over_bf16']:>8.2f} {floor_bf16 * 1e6:>10.1f} {floor_nf4 * 1e6:>9.1f} "
                  f"{row['nf4_over_floor']:>9.2f}", flush=True)
    decode = [r for r in rows if r["m"] <= 64]
    if decode:
        worst = max(decode, key=lambda r: r["nf4_over_bf16"])
        print(f"\ndecode (M <= 64): NF4 is at worst {worst['nf4_over_bf16']:.2f}x bf16 "
              f"({worst['shape']}, M={worst['m']}) and at worst "
              f"{max(r['nf4_over_floor'] for r in decode):.1f}x its own weight-read floor. "
              "A fused NF4 kernel can win at most the gap to that floor.")
    return rows, {"device": torch.cuda.get_device_name(0), "bandwidth_Bps": bandwidth, "l2_bytes": l2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--max-copies", type=int, default=256, help="most rotated layer copies")
    parser.add_argument("--out", type=Path, default=RESULTS / "nf4_matmul.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/nf4_matmul.py needs a CUDA device (none found): it measures bitsandbytes' "
              "CUDA NF4 matmul against bf16. Run it on a GPU machine (bring the bitsandbytes wheel).",
              file=sys.stderr)
        return 2
    rows, machine = bench(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import bitsandbytes

    meta = {**machine, "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(), "args": {k: str(v) for k, v in vars(args).items()}}
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
