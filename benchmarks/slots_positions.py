"""Which adapter gets each answer token right? A per-position probe of the slot tasks.

Usage::

    .venv/bin/python benchmarks/slots_positions.py --per-task 10 > benchmarks/results/slots/positions_dev.txt

For the first ``--per-task`` dev items of every slot task, one teacher-forced forward per
configuration (base, each shipped adapter, the oracle switch) gives, at every answer position,
whether the argmax is the gold token. Each token is printed as ``'token':owner:marks`` where
the marks are one letter per configuration in the order of the last line (``.`` = wrong). The
"best-of" line is the share of items where every position has at least one configuration right:
an upper bound for a per-token choice among them (not reachable exactly, as the choice at one
position changes the context of the next).
"""

from __future__ import annotations

import argparse

import torch

import moa
from moa.data import load_slots
from moa.eval.assets import load_adapters, shipped_adapters_dir
from moa.eval.teacher_forced import correct_positions, explicit_rows, make_batch, oracle_switch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-task", type=int, default=10)
    parser.add_argument("--show", type=int, default=3, help="items printed per task")
    args = parser.parse_args()
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    load_adapters(model, shipped_adapters_dir())
    dev = load_slots("dev")
    tasks = list(dict.fromkeys(e.meta["task"] for e in dev))
    examples = [e for t in tasks for e in [x for x in dev if x.meta["task"] == t][: args.per_task]]
    batch = make_batch(model.tokenizer, examples)
    plans = {"base": explicit_rows(None), **{a: explicit_rows(a) for a in model.adapter_names},
             "oracle": oracle_switch()}
    hits = {}
    for name, plan in plans.items():
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                           **plan(model, batch)).logits
        hits[name] = correct_positions(logits.float(), batch.labels)[1]
    tokenizer = model.tokenizer
    for t, task in enumerate(tasks):
        rows = range(t * args.per_task, (t + 1) * args.per_task)
        print(f"=== {task}")
        for r in list(rows)[: args.show]:
            item = batch.items[r]
            start = item.prompt_length
            cells = []
            for j, token in enumerate(item.input_ids[start:]):
                marks = "".join(n[0] if hits[n][r, start - 1 + j] else "." for n in plans)
                cells.append(f"{tokenizer.decode([token])!r}:{(item.owners[j] or '-')[:2]}:{marks}")
            print(" ".join(cells))
        span = slice(rows.start, rows.stop)
        best_of = torch.stack([hits[n][span] for n in plans]).any(0).all(-1).float().mean()
        oracle = hits["oracle"][span].all(-1).float().mean()
        print(f"best-of per position: {float(best_of):.2f}   oracle switch: {float(oracle):.2f}")
    print("order:", list(plans))


if __name__ == "__main__":
    main()
