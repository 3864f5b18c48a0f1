"""Arithmetic domain: 2-3 small integer terms with + and - (sometimes one x) -> the number.

Operands of ``+``/``-`` are 0-99; a product (one in five expressions) has two factors
of 2-12. Usual precedence applies (``3 × 4 + 5`` is 17). An expression string never
appears in two splits. Scoring: the last number in the prediction equals the value.

The answer is the worked reduction, one operation per step, ending with the value:
``23 + 45 - 12 = 68 - 12 = 56``. A 135M model cannot add three two-digit numbers in one
token reliably, but it can copy an expression and do one two-operand step at a time
(the same data with bare answers reached 23 % dev accuracy after 600 steps).
"""

from __future__ import annotations

import random

from moa.data.common import Example, assign_phrasings, make_examples, rng_for

DOMAIN = "arithmetic"

PHRASINGS: tuple[str, ...] = (
    "What is {expr}?",
    "Compute {expr}.",
    "Calculate {expr} and give only the number.",
    "{expr} = ?",
    "Work out the value of {expr}.",
)
HELD_OUT: tuple[int, ...] = (4,)

SIZES = {"train": 2500, "dev": 100, "test": 250}
TIMES = "\u00d7"


def render(terms: list[int], ops: list[str]) -> str:
    """Write terms and operators as ``12 + 7 - 3`` (``×`` for a product)."""
    parts = [str(terms[0])]
    for op, term in zip(ops, terms[1:]):
        parts += [op, str(term)]
    return " ".join(parts)


def evaluate(terms: list[int], ops: list[str]) -> int:
    """Value of ``terms`` joined by ``ops`` (``+``, ``-``, ``×``) with usual precedence."""
    # fold products first, then add/subtract left to right
    values, signs = [terms[0]], []
    for op, term in zip(ops, terms[1:]):
        if op == TIMES:
            values[-1] *= term
        else:
            values.append(term)
            signs.append(op)
    total = values[0]
    for op, value in zip(signs, values[1:]):
        total = total + value if op == "+" else total - value
    return total


def worked_answer(terms: list[int], ops: list[str]) -> str:
    """The reduction of ``terms``/``ops`` one operation per step: ``3 × 4 + 5 = 12 + 5 = 17``.

    Products are folded first (usual precedence), then ``+``/``-`` left to right; the last
    number is always the value (:func:`evaluate`), which is all the metric reads.
    """
    terms, ops = list(terms), list(ops)
    steps = [render(terms, ops)]
    while ops:
        i = ops.index(TIMES) if TIMES in ops else 0
        a, b, op = terms[i], terms[i + 1], ops[i]
        folded = a * b if op == TIMES else a + b if op == "+" else a - b
        terms[i:i + 2] = [folded]
        del ops[i]
        steps.append(render(terms, ops))
    return " = ".join(steps)


def random_expression(rng: random.Random) -> tuple[list[int], list[str]]:
    """Draw one expression: 2 or 3 terms, ``+``/``-``, at most one small product."""
    n_terms = 2 if rng.randrange(5) < 2 else 3
    ops = [rng.choice("+-") for _ in range(n_terms - 1)]
    terms = [rng.randrange(100) for _ in range(n_terms)]
    if rng.randrange(5) == 0:  # one product of two small factors
        i = rng.randrange(n_terms - 1)
        ops[i] = TIMES
        terms[i] = rng.randrange(2, 13)
        terms[i + 1] = rng.randrange(2, 13)
    return terms, ops


def expression_between(
    rng: random.Random, low: int, high: int, seen: set[str] | None = None
) -> tuple[list[int], list[str], int]:
    """Draw expressions until one's value is in ``[low, high]``: ``(terms, ops, value)``.

    With ``seen``, an expression whose text is in it is skipped, and the one returned is added.
    """
    while True:
        terms, ops = random_expression(rng)
        value = evaluate(terms, ops)
        if not low <= value <= high:
            continue
        if seen is not None:
            text = render(terms, ops)
            if text in seen:
                continue
            seen.add(text)
        return terms, ops, value


def generate() -> dict[str, list[Example]]:
    """Build the train/dev/test examples of the arithmetic domain (deterministic)."""
    seen: set[str] = set()
    out: dict[str, list[Example]] = {}
    for split in ("test", "dev", "train"):
        rng = rng_for(DOMAIN, split)
        items = []
        phrasings = assign_phrasings(SIZES[split], split, len(PHRASINGS), HELD_OUT)
        while len(items) < SIZES[split]:
            terms, ops = random_expression(rng)
            expr = render(terms, ops)
            if expr in seen:
                continue
            seen.add(expr)
            value = evaluate(terms, ops)
            k = next(phrasings)
            meta = {"expression": expr, "value": value}
            items.append((PHRASINGS[k].format(expr=expr), worked_answer(terms, ops), k, meta))
        out[split] = make_examples(DOMAIN, split, items)
    return {s: out[s] for s in ("train", "dev", "test")}
