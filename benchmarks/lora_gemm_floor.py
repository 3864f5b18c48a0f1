"""The floor of the dense decode path: only its LoRA GEMMs, outside the model.

The decode step of ``decode_step.py`` (16 rows, 8 adapters r=16 on all 7 linear kinds of the
default base's 30 layers, row i on adapter i % 8) does, per adapted layer, one shrink
``x @ A_all^T`` scaled per column and one expand. This times those 210 shrinks and expands
alone, on random weights of the same shapes, with nothing else touching memory: what the
adapters' math costs at best, to set against the base's step time. Strategies:

* ``s0``: moa's dense path (batched expand per adapter, products summed in slot order);
* ``s1``: the same with ``A`` stored transposed;
* ``s2``: expand only each adapter's own rows (gathered), then ``index_add_``;
* ``s3``: one expand GEMM over all rank columns (not bit-stable per row: see ``moa/kernels/dense.py``);
* ``shrink``: the shrink alone; ``none``: the loop alone.

Run: ``.venv/bin/python benchmarks/lora_gemm_floor.py``
"""

from __future__ import annotations

import statistics
import time

import torch

T, ADAPTERS, RANK = 16, 8, 16
#: (in, out) of q, k, v, o, gate, up, down in the default base, for its 30 layers
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 30


def main() -> None:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    layers = []
    for h_in, h_out in SHAPES:
        lora_a = torch.randn(ADAPTERS * RANK, h_in, generator=gen) * 0.05
        lora_b = torch.randn(ADAPTERS * RANK, h_out, generator=gen) * 0.05  # B transposed, as packed
        layers.append((lora_a, lora_a.t().contiguous(), lora_b, lora_b.view(ADAPTERS, RANK, h_out)))
    xs = {h: torch.randn(T, h, generator=gen) for h in (576, 1536)}
    outs = {h: torch.randn(T, h, generator=gen) for h in (576, 192, 1536)}
    coeff = torch.zeros(T, ADAPTERS * RANK)  # row t on adapter t % 8, weight x scale 0.5
    for t in range(T):
        coeff[t, (t % ADAPTERS) * RANK:(t % ADAPTERS + 1) * RANK] = 0.5
    tokens = torch.arange(T).view(T // ADAPTERS, ADAPTERS).t().reshape(-1)  # pairs grouped by adapter
    pairs = T // ADAPTERS

    def s0(a, a_t, b, b3, x, out):
        h = x @ a.t() * coeff
        out.add_(torch.bmm(h.view(T, ADAPTERS, RANK).transpose(0, 1), b3).sum(0))

    def s1(a, a_t, b, b3, x, out):
        h = x @ a_t * coeff
        out.add_(torch.bmm(h.view(T, ADAPTERS, RANK).transpose(0, 1), b3).sum(0))

    def s2(a, a_t, b, b3, x, out):
        h = x @ a.t() * coeff
        own = h.view(T, ADAPTERS, RANK)[tokens.view(ADAPTERS, pairs), torch.arange(ADAPTERS)[:, None]]
        out.index_add_(0, tokens, torch.bmm(own, b3).view(-1, out.shape[1]))

    def s3(a, a_t, b, b3, x, out):
        out.add_(x @ a.t() * coeff @ b)

    def shrink(a, a_t, b, b3, x, out):
        return x @ a.t() * coeff

    def none(*_):
        return None

    strategies = {"s0": s0, "s1": s1, "s2": s2, "s3": s3, "shrink": shrink, "none": none}
    times: dict[str, list[float]] = {name: [] for name in strategies}
    with torch.inference_mode():
        for round_index in range(12):  # interleaved; the first two warm up
            for name, run in strategies.items():
                start = time.perf_counter()
                for (h_in, h_out), layer in zip(SHAPES, layers, strict=True):
                    run(*layer, xs[h_in], outs[h_out])
                if round_index >= 2:
                    times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:8s} {1000 * statistics.median(values):7.2f} ms")


if __name__ == "__main__":
    main()
