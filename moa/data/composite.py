"""Composite prompts: tasks that need two domains at once (test only, about 50 items).

No single domain adapter covers them, which is where a mixture can beat every single
adapter. Each example's ``meta`` says which domains it ``combines`` and which metric it
is scored with (``score_as``), plus what that metric needs. Kinds:

* ``arithmetic_to_french``: compute a small expression, answer in French words (french).
* ``french_to_arithmetic``: a number given in French words plus/minus digits -> digits (arithmetic).
* ``french_in_code``: a Python function returning a French number word (code).
* ``french_number_in_code``: a code task whose threshold is written in French words (code).
* ``french_country_in_sql``: an SQL question naming the country by its French name (sql).
"""

from __future__ import annotations

import random
from typing import Any

from moa.data import arithmetic, code, sql
from moa.data.chinook import run_query, schema_text
from moa.data.common import COMPOSITE, Example, make_examples, require, rng_for
from moa.data.french import number_words

COUNTS = {
    "arithmetic_to_french": 16,
    "french_to_arithmetic": 10,
    "french_in_code": 8,
    "french_number_in_code": 8,
    "french_country_in_sql": 10,
}

TEMPLATES: dict[str, tuple[str, ...]] = {
    "arithmetic_to_french": (
        "Compute {expr} and write the result in French words.",
        "What is {expr}? Answer in French words.",
        "Calculate {expr}, then spell the result out in French.",
    ),
    "french_to_arithmetic": (
        'What is the French number "{words}" {op} {b}? Answer with digits.',
        'Take the number written in French as "{words}", {verb} {b}, and give the result in digits.',
    ),
    "french_in_code": (
        "Write a Python function solve() that returns the French word for {n} as a string.",
        "Implement solve() in Python: return the number {n} spelled out in French, as a string.",
    ),
    "french_number_in_code": (
        "Write a Python function solve(nums) that returns {op} of the even numbers in nums greater than {words}.",
    ),
    "french_country_in_sql": (
        (
            'Tables: {schema}\nQuestion: How many customers live in the country whose French name is "{fr}"?\n'
            "Write the SQLite query."
        ),
        (
            'Tables: {schema}\nQuestion: What is the total of the invoices billed to the country called "{fr}" '
            "in French?\nWrite the SQLite query."
        ),
    ),
}


def _arithmetic_to_french(rng: random.Random, i: int) -> tuple[str, str, int, dict[str, Any]]:
    terms, ops, value = arithmetic.expression_between(rng, 0, 200)
    expr = arithmetic.render(terms, ops)
    prompt = TEMPLATES["arithmetic_to_french"][i % 3].format(expr=expr)
    return prompt, number_words(value), i % 3, {"combines": ["arithmetic", "french"], "score_as": "french",
                                         "expression": expr, "value": value}


def _french_to_arithmetic(rng: random.Random, i: int) -> tuple[str, str, int, dict[str, Any]]:
    n, b = rng.randrange(20, 100), rng.randrange(2, 20)
    plus = i % 2 == 0
    value = n + b if plus else n - b
    prompt = TEMPLATES["french_to_arithmetic"][(i // 2) % 2].format(words=number_words(n), op="plus" if plus else "minus", b=b,
                             verb="add" if plus else "subtract")
    return prompt, str(value), (i // 2) % 2, {"combines": ["french", "arithmetic"], "score_as": "arithmetic",
                                "number": n, "value": value}


def _french_in_code(rng: random.Random, i: int) -> tuple[str, str, int, dict[str, Any]]:
    n = rng.randrange(11, 100)
    words = number_words(n)
    prompt = TEMPLATES["french_in_code"][i % 2].format(n=n)
    source = f'def solve():\n    return "{words}"'
    meta = {"combines": ["code", "french"], "score_as": "code", "entry_point": "solve", "spread_args": True,
            "tests": [[[], words]]}
    return prompt, source, i % 2, meta


def _french_number_in_code(rng: random.Random, i: int) -> tuple[str, str, int, dict[str, Any]]:
    op = ("sum", "count")[i % 2]
    k = rng.randrange(11, 20)
    prompt = TEMPLATES["french_number_in_code"][0].format(op=f"the {op}", words=number_words(k))
    body = code.OPS[op][1].format(p=f"x % 2 == 0 and x > {k}")
    meta = {"combines": ["code", "french"], "score_as": "code", "entry_point": "solve",
            "tests": code.make_tests(op, [("even", None), ("gt", k)], rng)}
    return prompt, f"def solve(nums):\n    return {body}", 0, meta


def _country_names() -> list[tuple[str, str]]:
    """(Chinook country, French name) for customer countries whose French name differs."""
    locale = require("babel", "babel").Locale
    en, fr = locale("en").territories, locale("fr").territories
    code_of = {name: c for c, name in en.items() if len(c) == 2}
    countries = [row[0] for row in run_query("SELECT DISTINCT country FROM customer ORDER BY country")]
    return [(c, fr[code_of[c]]) for c in countries if c in code_of and fr[code_of[c]] != c]


def _french_country_in_sql(rng: random.Random, i: int, countries: list[tuple[str, str]]) -> tuple[str, str, int, dict[str, Any]]:
    country, french = countries[i % len(countries)]
    if i % 2 == 0:
        tables, gold = ["customer"], f"SELECT COUNT(*) FROM customer WHERE country = {sql.quote(country)}"
    else:
        tables, gold = ["invoice"], f"SELECT SUM(total) FROM invoice WHERE billing_country = {sql.quote(country)}"
    prompt = TEMPLATES["french_country_in_sql"][i % 2].format(schema=schema_text(tables), fr=french)
    meta = {"combines": ["sql", "french"], "score_as": "sql", "gold_sql": gold,
            "gold_result": [list(r) for r in run_query(gold)]}
    return prompt, gold, i % 2, meta


def generate() -> dict[str, list[Example]]:
    """Build the composite examples (all in a ``test`` split; deterministic)."""
    rng = rng_for(COMPOSITE, "items")
    countries = _country_names()
    rng.shuffle(countries)
    makers = {
        "arithmetic_to_french": _arithmetic_to_french,
        "french_to_arithmetic": _french_to_arithmetic,
        "french_in_code": _french_in_code,
        "french_number_in_code": _french_number_in_code,
        "french_country_in_sql": lambda r, i: _french_country_in_sql(r, i, countries),
    }
    items = []
    for kind, count in COUNTS.items():
        for i in range(count):
            prompt, answer, phrasing, meta = makers[kind](rng, i)
            items.append((prompt, answer, phrasing, {"kind": kind, **meta}))
    return {"test": make_examples(COMPOSITE, "test", items)}

