"""Mixed-batch forward cost on the default base: moa vs PEFT, side by side in one run.

Batch 16 x 64 tokens, 8 LoRA adapters r=16 on all 7 linear kinds. For the fp32 and the
NF4 base it times (forward, no grad, KV cache off):

* ``base``: the plain transformers model (no wrappers) - the denominator of every ratio
* ``moa no-adapter rows``: moa's wrapped model with every row on the base
* ``moa single``: every row on one adapter (``set_adapter``)
* ``moa mixed-8``: row i on adapter i % 8 (``adapter_names=``)
* ``moa top-2``: row i on 0.6 * adapter i % 8 + 0.4 * adapter (i + 1) % 8
* ``peft single`` / ``peft mixed-8``: PEFT on the same weights (``adapter_names=``)

Timings are interleaved (one forward of each variant per round) and the median of the
rounds is reported, so drift on the machine hits every variant alike. Prints a table
and writes JSON to ``benchmarks/results/mixed_batch.json``.

Run: ``.venv/bin/python benchmarks/mixed_batch.py [--rounds 7] [--precision fp32 nf4]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import moa
from moa.model.base_loading import default_base_path, load_base

BATCH, SEQ, ADAPTERS, RANK = 16, 64, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_peft_adapters(base_dir: Path, out_dir: Path) -> list[Path]:
    """Save 8 random PEFT LoRA adapters (r=16, all 7 linear kinds) and return their folders."""
    import peft

    base, _ = load_base(base_dir, quantization=None)
    peft_model = None
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights="gaussian")
        if peft_model is None:
            peft_model = peft.get_peft_model(base, config, adapter_name=f"a{i}")
        else:
            peft_model.add_adapter(f"a{i}", config)
        with torch.no_grad():  # non-zero B so the adapters do something
            for name, param in peft_model.named_parameters():
                if f"lora_B.a{i}." in name:
                    param.normal_(std=0.01)
    assert peft_model is not None
    peft_model.save_pretrained(out_dir)
    return [out_dir / f"a{i}" for i in range(ADAPTERS)]  # PEFT saves named adapters in subfolders


def time_rounds(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Interleaved timings: one call of every variant per round; round 0 is warm-up."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(rounds + 1):
        for name, run in variants.items():
            start = time.perf_counter()
            with torch.no_grad():
                run()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return times


def bench_precision(precision: str, base_dir: Path, adapter_dirs: list[Path], rounds: int) -> dict:
    import peft

    quantization = "nf4" if precision == "nf4" else None
    ids = torch.randint(100, 20000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    names = [f"a{i}" for i in range(ADAPTERS)]
    mixed_rows = [names[i % ADAPTERS] for i in range(BATCH)]
    top2_rows = [{names[i % ADAPTERS]: 0.6, names[(i + 1) % ADAPTERS]: 0.4} for i in range(BATCH)]

    plain, _ = load_base(base_dir, quantization=quantization)
    model = moa.MixtureModel(load_base(base_dir, quantization=quantization)[0])
    for name, folder in zip(names, adapter_dirs, strict=True):
        model.load_adapter(folder, adapter_name=name)
    peft_model = peft.PeftModel.from_pretrained(load_base(base_dir, quantization=quantization)[0], adapter_dirs[0], adapter_name=names[0])
    for name, folder in zip(names[1:], adapter_dirs[1:], strict=True):
        peft_model.load_adapter(folder, adapter_name=name)
    peft_model.eval()

    with torch.no_grad():  # same weights, same answers: a sanity check on what is timed
        ours = model(ids, adapter_names=mixed_rows).logits
        theirs = peft_model(ids, adapter_names=mixed_rows).logits
        agreement = float((ours - theirs).abs().max())

    def moa_single():
        model.set_adapter(names[0])
        return model(ids)

    variants = {
        "base": lambda: plain(ids, use_cache=False),
        "moa no-adapter rows": lambda: model(ids, adapter_names=[None] * BATCH, use_cache=False),
        "moa single": moa_single,
        "moa mixed-8": lambda: model(ids, adapter_names=mixed_rows, use_cache=False),
        "moa top-2": lambda: model(ids, adapter_weights=top2_rows, use_cache=False),
        "peft single": lambda: peft_model(ids, adapter_names=[names[0]] * BATCH, use_cache=False),
        "peft mixed-8": lambda: peft_model(ids, adapter_names=mixed_rows, use_cache=False),
    }
    times = time_rounds(variants, rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["base"]
    addon_moa = medians["moa mixed-8"] - base
    addon_peft = medians["peft mixed-8"] - base
    return {
        "precision": precision,
        "median_seconds": medians,
        "all_seconds": times,
        "ratio_to_base": {name: value / base for name, value in medians.items()},
        "addon_seconds": {"moa mixed-8": addon_moa, "peft mixed-8": addon_peft},
        "addon_moa_over_peft": addon_moa / addon_peft if addon_peft > 0 else None,
        "max_abs_logit_diff_moa_vs_peft": agreement,
    }


def render(result: dict) -> str:
    lines = [f"\n{result['precision']}: batch {BATCH} x {SEQ}, {ADAPTERS} adapters r={RANK}, all 7 linear kinds"]
    lines.append(f"{'variant':<22} {'median s':>10} {'x base':>8}")
    for name, seconds in result["median_seconds"].items():
        lines.append(f"{name:<22} {seconds:>10.3f} {result['ratio_to_base'][name]:>8.3f}")
    addon = result["addon_seconds"]
    ratio = result["addon_moa_over_peft"]
    lines.append(
        f"add-on over base: moa mixed-8 {addon['moa mixed-8']:+.3f} s, peft mixed-8 {addon['peft mixed-8']:+.3f} s"
        + (f" (moa/peft = {ratio:.2f})" if ratio is not None else "")
    )
    lines.append(f"max |logit| difference moa vs peft, mixed-8: {result['max_abs_logit_diff_moa_vs_peft']:.2e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds after one warm-up round")
    parser.add_argument("--precision", nargs="+", default=["fp32", "nf4"], choices=["fp32", "nf4"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mixed_batch.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_dir = default_base_path()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_peft_adapters(base_dir, Path(tmp))
        for precision in args.precision:
            result = bench_precision(precision, base_dir, adapter_dirs, args.rounds)
            print(render(result), flush=True)
            results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "moa": moa.__version__,
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
