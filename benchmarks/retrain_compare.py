"""Two versions of one demo adapter on the same held-out items: the shipped one and a retrained one.

Issue 15's acceptance compares the arithmetic adapter retrained through the Trainer path
(``examples/train_demo_adapters.py --out DIR --domains arithmetic``) with the shipped one on
48 dev items, where one item is 2.1 points. This scores both, side by side in one process,
on every dev and test item of the domain (greedy generation and scoring as the recipe's
``moa.train.sft.dev_accuracy`` does), with a paired bootstrap 95 % interval of the difference.

Run: ``.venv/bin/python benchmarks/retrain_compare.py --retrained /tmp/retrain [--domain arithmetic]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import moa
from moa.data import load_split
from moa.data.chat import answer_token_budget
from moa.eval.assets import shipped_adapters_dir
from moa.eval.runner import generate_answers, score_examples
from moa.eval.slots import paired_bootstrap
from moa.train.recipes import DEMO_RECIPE


def correct_per_item(model: moa.MixtureModel, name: str, examples: list) -> list[bool]:
    """Whether each greedy answer of adapter ``name`` is right (as the recipe's dev accuracy)."""
    budget = answer_token_budget(model.tokenizer, [e.answer for e in examples])
    answers = generate_answers(model, [e.prompt for e in examples], [{name: 1.0}] * len(examples),
                               max_new_tokens=budget, batch_size=16, progress=True)
    return [bool(c) for c in score_examples(examples, answers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--retrained", type=Path, required=True, help="folder holding the retrained adapter")
    parser.add_argument("--domain", default="arithmetic")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "retrain_compare.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = moa.MixtureModel.from_pretrained("default", quantization=DEMO_RECIPE.quantization)
    model.load_adapter(shipped_adapters_dir() / args.domain, adapter_name="shipped")
    model.load_adapter(args.retrained / args.domain, adapter_name="retrained")
    report = {"domain": args.domain}
    for split in ("dev", "test"):
        examples = load_split(args.domain, split)
        right = {name: correct_per_item(model, name, examples) for name in ("shipped", "retrained")}
        mean, low, high = paired_bootstrap(right["retrained"], right["shipped"])
        report[split] = {**{name: {"accuracy": round(100 * sum(r) / len(r), 1), "right": sum(r), "items": len(r)}
                            for name, r in right.items()},
                         "retrained_minus_shipped": [round(100 * v, 1) for v in (mean, low, high)]}
        print(split, json.dumps(report[split]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
