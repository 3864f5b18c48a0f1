"""What the non-finite logits check costs a forward (``moa.model.finite_logits``).

On the default base (fp32, so bitsandbytes' CPU path does not blur the numbers) with the
five shipped adapters, a batch of rows, each on a different adapter, is run two ways,
interleaved round by round: ``model(..., check_finite=True)`` (the default: one
sum over the logits in a hook on the LM head, :func:`moa.model.finite_logits.all_finite`) and
``check_finite=False``.
Two shapes: a prefill (``--batch`` x ``--seq`` tokens, every position's logits) and a decode
step (``--batch`` x 1 token). The check's own time on logits of each shape is timed too,
since on a busy VM two forwards differ by more than the check costs. Medians of the rounds;
writes ``benchmarks/results/finite_check.json``.

Run: ``.venv/bin/python benchmarks/finite_check.py [--rounds 9] [--batch 16] [--seq 64] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import moa
from moa.data import DOMAINS
from moa.eval.assets import load_adapters, shipped_adapters_dir
from moa.model.finite_logits import all_finite

OUT = Path(__file__).resolve().parent / "results" / "finite_check.json"


def timed(call) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = moa.MixtureModel.from_pretrained("default", quantization="none")
    load_adapters(model, shipped_adapters_dir())
    names = [DOMAINS[i % len(DOMAINS)] for i in range(args.batch)]
    generator = torch.Generator().manual_seed(0)
    shapes = {"prefill": args.seq, "decode": 1}
    results = {}
    for shape, seq in shapes.items():
        ids = torch.randint(0, model.config.vocab_size, (args.batch, seq), generator=generator)
        times: dict[str, list[float]] = {"checked": [], "unchecked": []}
        timed(lambda: model(ids, adapter_names=names))  # warm-up
        for _ in range(args.rounds):
            times["checked"].append(timed(lambda: model(ids, adapter_names=names, check_finite=True)))
            times["unchecked"].append(timed(lambda: model(ids, adapter_names=names, check_finite=False)))
        logits = torch.randn(args.batch, seq, model.config.vocab_size)
        check = [timed(lambda: all_finite(logits)) for _ in range(args.rounds * 5)]
        checked, unchecked = statistics.median(times["checked"]), statistics.median(times["unchecked"])
        results[shape] = {
            "batch": args.batch, "tokens_per_row": seq, "vocab": model.config.vocab_size,
            "checked_median_s": round(checked, 4), "unchecked_median_s": round(unchecked, 4),
            "checked_vs_unchecked": round(checked / unchecked, 4),
            "check_alone_median_ms": round(statistics.median(check) * 1e3, 4),
            "check_alone_share_of_forward": round(statistics.median(check) / unchecked, 5),
        }
        print(f"{shape:8s} {args.batch}x{seq}: checked {checked:.4f} s, unchecked {unchecked:.4f} s "
              f"({checked / unchecked:.3f}x); the check alone {statistics.median(check) * 1e3:.3f} ms "
              f"({statistics.median(check) / unchecked:.2%} of the forward)")
    record = {"results": results, "rounds": args.rounds, "threads": args.threads, "precision": "fp32",
              "adapters": list(DOMAINS), "torch": torch.__version__, "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
