"""Slot tasks: answers made of segments, each in one domain adapter's own output format.

Where the older composite prompts (:mod:`moa.data.composite`) ask for one *fused* output
(French words that are also a sum), a slot task's answer is a sequence of segments, and
every segment is exactly what one domain's adapter was trained to write. A mixture that
switches adapter at the hand-over can get every token right; no single adapter can. This
is the setting where learned per-token mixing is reported to win (LoRA-Flow, arXiv
2402.11455; MeteoRA, arXiv 2405.13053) and where fused outputs are reported to fail
(arXiv 2506.13479), so the suite keeps one fused control.

Tasks (``meta["task"]``), with why each format was chosen:

* ``arithmetic_french``: ``23 + 45 - 12 = 68 - 12 = 56`` (the arithmetic adapter's worked
  reduction, verbatim), a newline, then ``cinquante-six`` (the French adapter's number
  words, verbatim). Values 0-999 so every value has French words without a sign.
* ``arithmetic_sql``: the same worked reduction, a newline, then
  ``SELECT id FROM invoice WHERE total > 56``: the SQL adapter's style (one line, no
  fence, no semicolon), using the worked value; the second segment copies a number the
  answer itself just produced.
* ``code_french``: ``def solve():\\n    return "cinquante-six"``: the code adapter's
  function frame with the French words as the string (segments code, french, code).
* ``code_icd``: the same frame returning an ICD-10-CM chapter title for a diagnosis
  (diagnoses from the ``icd`` domain's split of the same name, so test diagnoses are the
  ICD test diagnoses and never seen in training).
* ``french_sql`` (the fused control): an SQL question whose threshold is given in French
  words; the answer is one SQL line with the number in digits. No segment boundary
  separates the skills, so switching cannot help; it is reported, not targeted.

Splits: ``train`` (256 per task; the first N of each task are the N-example training set
for N in 16, 64, 256), ``dev`` (50 per task), ``test`` (200 per task). Expressions and
numbers never repeat across splits; test also uses one held-out phrasing per task.
Every example's ``meta["segments"]`` is ``[[text, domain], ...]`` whose texts concatenate
to the answer: the ownership the oracle switch and the gate's agreement metric use.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from moa.data import arithmetic, icd as icd_domain
from moa.data.common import SLOTS, Example, make_examples, rng_for
from moa.data.french import number_words
from moa.data.loading import load_split

DOMAIN = SLOTS
TASKS: tuple[str, ...] = ("arithmetic_french", "arithmetic_sql", "code_french", "code_icd", "french_sql")
#: The tasks whose answers switch adapter between segments (the fused control is not one).
SWITCH_TASKS: tuple[str, ...] = TASKS[:4]
SIZES = {"train": 256, "dev": 50, "test": 200}
TRAIN_SIZES: tuple[int, ...] = (16, 64, 256)

INVOICE_SCHEMA = "invoice(id, customer_id, invoice_date, billing_city, billing_country, total)"

PHRASINGS: dict[str, tuple[str, ...]] = {
    "arithmetic_french": (
        "Compute {expr}, then write the result in French words.",
        "Work out {expr} step by step, then spell the result out in French.",
        "What is {expr}? Show the steps, then give the number in French words.",
        "Evaluate {expr}; afterwards write its value in French.",
    ),
    "arithmetic_sql": (
        "Compute {expr}. Then write the SQLite query listing the ids of the invoices whose total is "
        "greater than that value.\nSchema: " + INVOICE_SCHEMA,
        "Work out {expr} step by step, then write an SQL query for the invoices (ids) with a total above "
        "the result.\nSchema: " + INVOICE_SCHEMA,
        "What is {expr}? Show the steps, then query the ids of the invoices whose total exceeds it.\n"
        "Schema: " + INVOICE_SCHEMA,
        "Evaluate {expr}; afterwards write the SQLite query returning the ids of invoices with total "
        "greater than the value.\nSchema: " + INVOICE_SCHEMA,
    ),
    "code_french": (
        "Write a Python function solve() that returns the number {n} written in French words, as a string.",
        "Implement solve() in Python: return {n} spelled out in French.",
        "Python: define solve() returning the French words for the number {n}.",
        "Give a Python function solve() whose return value is the French name of the number {n}.",
    ),
    "code_icd": (
        'Write a Python function solve() that returns the ICD-10-CM chapter title of the diagnosis "{d}".',
        'Implement solve() in Python: return the ICD-10-CM chapter of "{d}" as a string.',
        'Python: define solve() returning the ICD-10-CM chapter that "{d}" belongs to.',
        'Give a Python function solve() whose return value is the ICD-10-CM chapter title for "{d}".',
    ),
    "french_sql": (
        "Write the SQLite query listing the ids of the invoices whose total is greater than {words}.\n"
        "Schema: " + INVOICE_SCHEMA,
        "Write an SQL query for the ids of the invoices with a total above {words}.\nSchema: " + INVOICE_SCHEMA,
        "Query the ids of the invoices whose total exceeds {words}.\nSchema: " + INVOICE_SCHEMA,
        "SQLite: the ids of invoices with total greater than {words}.\nSchema: " + INVOICE_SCHEMA,
    ),
}
HELD_OUT = 3  # the last phrasing of every task appears in test only


def invoice_query(value: int) -> str:
    """The SQL segment of ``arithmetic_sql`` and ``french_sql``."""
    return f"SELECT id FROM invoice WHERE total > {value}"


def function_segments(value_segment: tuple[str, str]) -> list[list[str]]:
    """``def solve():\\n    return "<value>"`` as code / value / code segments."""
    return [['def solve():\n    return "', "code"], list(value_segment), ['"', "code"]]


def diagnosis_of(example: Example) -> str:
    """The diagnosis text of an ``icd`` example (its prompt, less the phrasing around it)."""
    before, after = icd_domain.PHRASINGS[example.phrasing].split("{desc}")
    return example.prompt[len(before):len(example.prompt) - len(after)]


def _expression(rng: random.Random, seen: set[str]) -> tuple[str, str, int]:
    """A fresh arithmetic expression with a value in 0-999: (expression, worked, value)."""
    terms, ops, value = arithmetic.expression_between(rng, 0, 999, seen)
    return arithmetic.render(terms, ops), arithmetic.worked_answer(terms, ops), value


def _phrasing(split: str, i: int) -> int:
    return i % len(PHRASINGS[TASKS[0]]) if split == "test" else i % HELD_OUT


class _Maker:
    """Draws the items of every task, keeping values disjoint across splits."""

    def __init__(self) -> None:
        self.words: Callable[[int], str] = number_words
        self.expressions: set[str] = set()
        self.numbers: dict[str, set[int]] = {}

    def number(self, task: str, rng: random.Random) -> int:
        """A number in 0-999 not yet used by ``task`` (in any split)."""
        used = self.numbers.setdefault(task, set())
        while True:
            n = rng.randrange(1000)
            if n not in used:
                used.add(n)
                return n

    def item(self, task: str, split: str, i: int, rng: random.Random, icd: list[Example]) -> tuple[str, list[list[str]], int, dict[str, Any]]:
        k = _phrasing(split, i)
        template = PHRASINGS[task][k]
        if task in ("arithmetic_french", "arithmetic_sql"):
            expr, worked, value = _expression(rng, self.expressions)
            tail = self.words(value) if task == "arithmetic_french" else invoice_query(value)
            owner = "french" if task == "arithmetic_french" else "sql"
            return template.format(expr=expr), [[worked, "arithmetic"], ["\n" + tail, owner]], k, {
                "expression": expr, "value": value}
        if task == "code_french":
            n = self.number(task, rng)
            return template.format(n=n), function_segments((self.words(n), "french")), k, {"value": n}
        if task == "code_icd":
            diagnosis = icd[i % len(icd)]
            description = diagnosis_of(diagnosis)
            return template.format(d=description), function_segments((diagnosis.answer, "icd")), k, {
                "code": diagnosis.meta["code"], "chapter": diagnosis.meta["chapter"]}
        n = self.number(task, rng)
        return template.format(words=self.words(n)), [[invoice_query(n), "sql"]], k, {"value": n}


def generate() -> dict[str, list[Example]]:
    """Build the train/dev/test examples of every slot task (deterministic)."""
    maker = _Maker()
    out: dict[str, list[Example]] = {}
    for split in ("test", "dev", "train"):
        icd = load_split("icd", split)
        random.Random(0).shuffle(icd)  # mix chapters; fixed order
        items = []
        for task in TASKS:
            rng = rng_for(DOMAIN, f"{task}:{split}")
            for i in range(SIZES[split]):
                prompt, segments, k, meta = maker.item(task, split, i, rng, icd)
                answer = "".join(text for text, _ in segments)
                items.append((prompt, answer, k, {"task": task, "segments": segments, **meta}))
        out[split] = make_examples(DOMAIN, split, items)
    return {s: out[s] for s in ("train", "dev", "test")}


def training_set(examples: list[Example], n: int) -> list[Example]:
    """The first ``n`` train examples of every switching task (N in :data:`TRAIN_SIZES`)."""
    by_task: dict[str, list[Example]] = {}
    for example in examples:
        by_task.setdefault(example.meta["task"], []).append(example)
    return [e for task in SWITCH_TASKS for e in by_task.get(task, [])[:n]]
