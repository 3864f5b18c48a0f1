"""Arithmetic domain: 2-3 small integer terms with + and - (sometimes one x) -> the number.

Operands of ``+``/``-`` are 0-99; a product (one in five expressions) has two factors
of 2-12. Usual precedence applies (``3 × 4 + 5`` is 17). An expression string never
appears in two splits. Scoring: the last number in the prediction equals the value.
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
            items.append((PHRASINGS[k].format(expr=expr), str(value), k, meta))
        out[split] = make_examples(DOMAIN, split, items)
    return {s: out[s] for s in ("train", "dev", "test")}
