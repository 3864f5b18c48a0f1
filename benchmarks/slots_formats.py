"""The ceiling of a switch over the shipped adapters, for the slot tasks and candidate formats.

Usage::

    .venv/bin/python benchmarks/slots_formats.py --items 20 --out benchmarks/results/slots

The issue asks, before any gate is trained, for an oracle switch that scores >= ~30 % exact
on each slot task, and for a task's formats to be fixed when it does not. This script
measures, teacher-forced on dev items, every slot task of :mod:`moa.data.slots` and the
second-version formats that were tried to fix them:

* ``oracle``: the segment owners as written (the hand-over rule);
* ``best assignment``: the best fixed choice of base / sql / code for each glue segment of a
  framed answer (the frame and the closing quote), the value segment kept with its domain
  (answers of two segments keep their owners): whether the
  formats fail only because the wrong adapter was named as the glue's owner;
* ``best-of``: the share of items where every position has at least one configuration
  (base or any adapter) whose argmax is right: an upper bound for any top-1 switch.

It also prints each owner's greedy continuation of the first item from its segment's start,
which shows *how* a format fails. Values are drawn from the dev splits (slot values, ICD dev
diagnoses, fresh expressions), so nothing here is test data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch

import moa
from moa.data import arithmetic, load_slots, load_split
from moa.data.chat import chat_prompt
from moa.data.common import Example
from moa.data.french import number_words
from moa.data.slots import diagnosis_of
from moa.eval.assets import load_adapters, shipped_adapters_dir
from moa.eval.teacher_forced import (
    correct_positions,
    explicit_rows,
    forced_logits,
    oracle_switch,
)
from moa.model import BASE_ROW

log = logging.getLogger("slots_formats")
GLUE_OWNERS = (BASE_ROW, "sql", "code")

Segments = list[list[str]]


def _example(name: str, prompt: str, segments: Segments) -> Example:
    return Example(id=name, domain="slots", prompt=prompt, answer="".join(t for t, _ in segments),
                   phrasing=0, split="dev", meta={"task": name, "segments": segments})


def _framed(frame: str, value: tuple[str, str], close: str, frame_owner: str) -> Segments:
    return [[frame, frame_owner], list(value), [close, frame_owner]]


def candidate_formats(count: int) -> dict[str, list[Example]]:
    """The slot tasks as shipped, and the second-version formats tried (``count`` items each)."""
    dev = load_slots("dev")
    out = {f"v1:{t}": [e for e in dev if e.meta["task"] == t][:count]
           for t in ("arithmetic_french", "arithmetic_sql", "code_french", "code_icd")}
    icd = load_split("icd", "dev")
    random.Random(0).shuffle(icd)
    rng = random.Random(1)
    numbers = [rng.randrange(1000) for _ in range(count)]
    diagnoses = [(diagnosis_of(d), d.answer) for d in icd[:count]]
    sql_words = "SELECT id FROM nombre WHERE en_lettres = '"
    sql_chapter = "SELECT name FROM patient WHERE chapter = '"
    fn_nums, fn_none = 'def solve(nums):\n    return "', 'def solve():\n    return "'
    forms: dict[str, Callable[[int, int], Example]] = {
        # SQL frames: the value from the prompt, in quotes, where the SQL adapter writes values
        "sql_french": lambda i, n: _example("sql_french", (
            f"Tables: nombre(id, en_lettres)\nQuestion: What is the id of the number {n}? The table stores "
            "numbers as French words.\nWrite the SQLite query."),
            _framed(sql_words, (number_words(n), "french"), "'", "sql")),
        "sql_icd": lambda i, n: _example("sql_icd", (
            "Tables: patient(id, name, diagnosis, chapter)\nQuestion: List the names of the patients in the "
            f'ICD-10-CM chapter that "{diagnoses[i][0]}" belongs to.\nWrite the SQLite query.'),
            _framed(sql_chapter, (diagnoses[i][1], "icd"), "'", "sql")),
        # the code adapter's own signature, solve(nums)
        "code_french(nums)": lambda i, n: _example("code_french(nums)", (
            f"Implement solve(nums) in Python: ignore nums and return the French words for the number {n}."),
            _framed(fn_nums, (number_words(n), "french"), '"', "code")),
        "code_icd(nums)": lambda i, n: _example("code_icd(nums)", (
            "Implement solve(nums) in Python: ignore nums and return the ICD-10-CM chapter title of "
            f'"{diagnoses[i][0]}".'), _framed(fn_nums, (diagnoses[i][1], "icd"), '"', "code")),
        # fill-in templates: the frame is in the prompt, to be copied
        "sql_french(fill)": lambda i, n: _example("sql_french(fill)", (
            f"Complete this SQLite query, writing the number {n} in French words where shown:\n"
            f"{sql_words}<{n} in French>'"), _framed(sql_words, (number_words(n), "french"), "'", "sql")),
        "sql_icd(fill)": lambda i, n: _example("sql_icd(fill)", (
            f'Complete this SQLite query with the ICD-10-CM chapter title of the diagnosis "{diagnoses[i][0]}":\n'
            f"{sql_chapter}<chapter>'"), _framed(sql_chapter, (diagnoses[i][1], "icd"), "'", "sql")),
        "code_french(fill)": lambda i, n: _example("code_french(fill)", (
            f"Complete this Python function, writing the number {n} in French words where shown:\n"
            f'{fn_none}<{n} in French>"'), _framed(fn_none, (number_words(n), "french"), '"', "code")),
        "code_arithmetic(comment)": lambda i, n: _code_arithmetic(rng),
    }
    for name, make in forms.items():
        out[name] = [make(i, numbers[i]) for i in range(count)]
    return out


def _code_arithmetic(rng: random.Random) -> Example:
    """The arithmetic adapter's worked steps as a comment inside the code adapter's function."""
    terms, ops, value = arithmetic.expression_between(rng, 0, 999)
    expr = arithmetic.render(terms, ops)
    return _example("code_arithmetic(comment)", (
        f"Write a Python function solve() that returns the value of {expr}, with the worked steps as a comment."),
        [["def solve():\n    # ", "code"], [arithmetic.worked_answer(terms, ops), "arithmetic"],
         [f"\n    return {value}", "code"]])


def _with_owners(example: Example, owners: tuple[str, ...]) -> Example:
    segments = [[text, owner] for (text, _), owner in zip(example.meta["segments"], owners, strict=True)]
    return _example(example.id, example.prompt, segments)


def _exact(model: moa.MixtureModel, examples: list[Example]) -> tuple[float, float]:
    """Oracle-switch exact match and share of right answer tokens (teacher-forced)."""
    batch, logits = forced_logits(model, examples, oracle_switch())
    rows, hit = correct_positions(logits, batch.labels)
    answer = batch.labels[:, 1:] != -100
    return float(rows.float().mean()), float((hit & answer).sum() / answer.sum())


def _best_of(model: moa.MixtureModel, examples: list[Example]) -> float:
    hits = []
    for route in (None, *model.adapter_names):
        batch, logits = forced_logits(model, examples, explicit_rows(route))
        answer = batch.labels[:, 1:] != -100
        hits.append(correct_positions(logits, batch.labels)[1] | ~answer)
    return float(torch.stack(hits).any(0).all(-1).float().mean())


def _continuation(model: moa.MixtureModel, example: Example, prefix: str, owner: str) -> str:
    tokenizer = model.tokenizer
    ids = tokenizer(chat_prompt(tokenizer, example.prompt) + prefix, add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=[owner],
                             max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:])


def measure(model: moa.MixtureModel, name: str, examples: list[Example]) -> dict:
    """Every number of one format (see the module docstring)."""
    owners = [o for _, o in examples[0].meta["segments"]]
    oracle, share = _exact(model, examples)
    glue = [0, 2] if len(owners) == 3 else []  # a frame around a value: the frame's two ends
    assignments = {" / ".join(owners): oracle}  # first, so a tie keeps the owners as written
    for choice in itertools.product(GLUE_OWNERS, repeat=len(glue)):
        trial = list(owners)
        for i, owner in zip(glue, choice):
            trial[i] = owner
        if " / ".join(trial) not in assignments:
            assignments[" / ".join(trial)] = _exact(model, [_with_owners(e, tuple(trial)) for e in examples])[0]
    best = max(assignments, key=assignments.get)
    first, prefix, continuations = examples[0], "", []
    for text, owner in first.meta["segments"]:
        continuations.append({"owner": owner, "after": prefix[-30:], "writes": _continuation(model, first, prefix, owner)})
        prefix += text
    row = {"format": name, "items": len(examples), "owners": owners, "oracle": oracle, "token_share": share,
           "best_assignment": best, "best_assignment_exact": assignments[best], "best_of": _best_of(model, examples),
           "example": {"prompt": first.prompt, "gold": first.answer}, "continuations": continuations}
    log.info("%s: oracle %.2f, best assignment %.2f (%s), best-of %.2f", name, oracle, assignments[best], best,
             row["best_of"])
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["Teacher-forced on dev items, exact match (share of items):", "",
             "| format | items | oracle switch | token share | best glue assignment | its exact | best-of (top-1 bound) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['items']} | {r['oracle']:.2f} | {r['token_share']:.2f} | "
                     f"{r['best_assignment']} | {r['best_assignment_exact']:.2f} | {r['best_of']:.2f} |")
    lines += ["", "What each owner writes from its segment's start (first item, gold context before it):", ""]
    for r in rows:
        lines.append(f"* **{r['format']}**: gold `{r['example']['gold']!r}`")
        lines += [f"  * {c['owner']} after `{c['after']!r}`: `{c['writes']!r}`" for c in r["continuations"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20, help="dev items per format")
    parser.add_argument("--out", default="benchmarks/results/slots", help="folder for slot_formats.{json,md}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = moa.MixtureModel.from_pretrained("default", quantization="nf4")
    load_adapters(model, shipped_adapters_dir())
    rows = [measure(model, name, examples) for name, examples in candidate_formats(args.items).items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slot_formats.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "slot_formats.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
