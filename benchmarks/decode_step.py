"""The decode step of a mixed batch: 16 rows over 8 adapters vs the base, moa vs PEFT.

Default base, 16 rows x ``--prompt`` tokens, 8 LoRA adapters r=16 on all 7 linear kinds,
row i on adapter i % 8. Each variant runs ``generate`` twice per round, with 1 and with
``1 + --steps`` new tokens (EOS masked); the difference is the time of ``--steps`` decode
steps (KV cache on), so the prefill drops out. Rounds interleave the variants; medians.

Variants: ``base`` (plain transformers model), ``moa mixed-8`` (``adapter_names=``),
``peft mixed-8`` (PEFT's ``adapter_names=``). Writes ``benchmarks/results/decode_step.json``.

Run: ``.venv/bin/python benchmarks/decode_step.py [--rounds 5] [--precision fp32]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moa  # noqa: E402
from mixed_batch import ADAPTERS, make_peft_adapters  # noqa: E402
from moa.model.base_loading import default_base_path, load_base  # noqa: E402

BATCH = 16


def main() -> None:
    import peft

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--precision", choices=["fp32", "nf4"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quantization = "nf4" if args.precision == "nf4" else None
    base_dir = default_base_path()
    ids = torch.randint(100, 20000, (BATCH, args.prompt), generator=torch.Generator().manual_seed(0))
    names = [f"a{i}" for i in range(ADAPTERS)]
    rows = [names[i % ADAPTERS] for i in range(BATCH)]
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_peft_adapters(base_dir, Path(tmp))
        plain, _ = load_base(base_dir, quantization=quantization)
        model = moa.MixtureModel(load_base(base_dir, quantization=quantization)[0])
        for name, folder in zip(names, folders, strict=True):
            model.load_adapter(folder, adapter_name=name)
        peft_model = peft.PeftModel.from_pretrained(load_base(base_dir, quantization=quantization)[0],
                                                    folders[0], adapter_name=names[0])
        for name, folder in zip(names[1:], folders[1:], strict=True):
            peft_model.load_adapter(folder, adapter_name=name)
        peft_model.eval()

    def gen(target, new, **kw):
        return target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=0, **kw)

    variants = {
        "base": lambda new: gen(plain, new),
        "moa mixed-8": lambda new: gen(model, new, adapter_names=rows),
        "peft mixed-8": lambda new: gen(peft_model, new, adapter_names=rows),
    }
    with torch.inference_mode():
        same = torch.equal(variants["moa mixed-8"](4), variants["peft mixed-8"](4))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(args.rounds + 1):
            for name, run in variants.items():
                start = time.perf_counter()
                run(1)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                run(1 + args.steps)
                if round_index:  # round 0 warms up
                    times[name].append((time.perf_counter() - start - prefill) / args.steps)
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratios = {name: medians[name] / medians["base"] for name in medians}
    print(f"decode step, {args.precision}, batch {BATCH} over {ADAPTERS} adapters r=16 all-linear, "
          f"prompt {args.prompt}, {torch.get_num_threads()} threads")
    for name in medians:
        print(f"  {name:<14} {1000 * medians[name]:8.1f} ms/step   {ratios[name]:.3f}x base")
    print(f"  moa and PEFT greedy tokens identical: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"precision": args.precision, "threads": torch.get_num_threads(),
                                    "machine": platform.platform(), "steps": args.steps, "prompt": args.prompt,
                                    "median_step_seconds": medians, "ratio_to_base": ratios,
                                    "all": times, "moa_equals_peft_tokens": same}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
