"""A decode step on the NF4 default base vs the float32 one, on CPU; and how often their answers agree.

Speed: the setting of ``decode_step.py`` (16 rows over 8 LoRA adapters r=16 on all 7 linear
kinds, row i on adapter i % 8, 64 prompt tokens, EOS masked). Each variant runs ``generate``
with 1 and with ``1 + --steps`` new tokens; the difference over ``--steps`` is one decode
step. Rounds interleave the variants; medians; ratio to float32.

Variants: ``fp32`` (``quantization=None``); ``nf4`` (``load_base``'s default: NF4 weights,
float32 compute); ``nf4 bf16 compute`` (``compute_dtype=torch.bfloat16``, the opt-in for CPUs
with native bf16, see :mod:`moa.model.nf4_compute`).

Agreement: 20 held-out test prompts (4 per domain, chat template) answered greedily (32
tokens) with their shipped adapter by each variant: how many answers equal float32's
word for word, and the share of equal tokens up to the first difference.

Writes ``benchmarks/results/nf4_cpu.json``.

Run: ``.venv/bin/python benchmarks/nf4_cpu.py [--rounds 5] [--threads 2]``
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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import moa  # noqa: E402
from mixed_batch import ADAPTERS, make_peft_adapters  # noqa: E402
from moa.model.base_loading import default_base_path, load_base  # noqa: E402
from moa.model.nf4_compute import cpu_has_native_bf16, default_nf4_compute_dtype  # noqa: E402

BATCH = 16
RESULTS = Path(__file__).resolve().parent / "results" / "nf4_cpu.json"
VARIANTS = {"fp32": (None, None), "nf4": ("nf4", None), "nf4 bf16 compute": ("nf4", torch.bfloat16)}


def load(quantization: str | None, compute_dtype: torch.dtype | None) -> moa.MixtureModel:
    base, tokenizer = load_base(default_base_path(), quantization=quantization, compute_dtype=compute_dtype)
    return moa.MixtureModel(base, tokenizer)


def step_times(models: dict[str, moa.MixtureModel], rounds: int, steps: int, prompt: int) -> dict[str, list[float]]:
    ids = torch.randint(100, 20000, (BATCH, prompt), generator=torch.Generator().manual_seed(0))
    rows = [f"a{i % ADAPTERS}" for i in range(BATCH)]

    def generate(model: moa.MixtureModel, new: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, adapter_names=rows)

    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(rounds + 1):
        for name, model in models.items():
            start = time.perf_counter()
            generate(model, 1)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            generate(model, 1 + steps)
            if round_index:  # round 0 warms up
                times[name].append((time.perf_counter() - start - prefill) / steps)
    return times


def answers(model: moa.MixtureModel, examples: list[Any]) -> list[list[int]]:
    out = []
    for example in examples:
        messages = [{"role": "user", "content": example.prompt}]
        inputs = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
        ids = model.generate(**inputs, max_new_tokens=32, do_sample=False, adapter_names=[example.domain])
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict[str, float]:
    same = sum(a == b for a, b in zip(reference, other, strict=True))
    prefix = []
    for a, b in zip(reference, other, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return {"identical_answers": same, "of": len(reference), "mean_equal_prefix_share": statistics.mean(prefix)}


def main() -> None:
    from moa.data import load_split
    from moa.eval.assets import load_adapters, shipped_adapters_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: load(*spec) for name, spec in VARIANTS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        folders = make_peft_adapters(default_base_path(), Path(tmp))
        for model in models.values():
            for i, folder in enumerate(folders):
                model.load_adapter(folder, adapter_name=f"a{i}")
    with torch.inference_mode():
        times = step_times(models, args.rounds, args.steps, args.prompt)
    medians = {name: statistics.median(v) for name, v in times.items()}
    ratios = {name: medians[name] / medians["fp32"] for name in medians}

    domains = ["sql", "code", "french", "arithmetic", "icd"]
    examples = [e for d in domains for e in load_split(d, "test")[:4]]
    for model in models.values():
        load_adapters(model, shipped_adapters_dir(), names=domains)
    with torch.inference_mode():
        outputs = {name: answers(model, examples) for name, model in models.items()}
    agree = {name: agreement(outputs["fp32"], outputs[name]) for name in models}

    compute = default_nf4_compute_dtype(torch.device("cpu"), torch.float32)
    native_bf16 = cpu_has_native_bf16()
    print(f"decode step, batch {BATCH} over {ADAPTERS} adapters r=16 all-linear, prompt {args.prompt}, "
          f"{torch.get_num_threads()} threads; NF4 default compute dtype: {compute}; CPU has native bf16: {native_bf16}")
    for name in medians:
        a = agree[name]
        print(f"  {name:<17} {1000 * medians[name]:8.1f} ms/step  {ratios[name]:.3f}x fp32   answers equal to fp32: "
              f"{a['identical_answers']}/{a['of']}, equal prefix {a['mean_equal_prefix_share']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": platform.platform(), "threads": torch.get_num_threads(), "steps": args.steps,
        "prompt": args.prompt, "rounds": args.rounds, "nf4_default_compute_dtype": str(compute),
        "cpu_native_bf16": native_bf16,
        "command": "python benchmarks/nf4_cpu.py " + " ".join(sys.argv[1:]),
        "median_step_seconds": medians, "ratio_to_fp32": ratios, "agreement_with_fp32": agree, "all": times,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
