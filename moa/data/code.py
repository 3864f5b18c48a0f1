"""Python code domain: templated function synthesis, one operation x two conditions.

A prompt asks for ``solve(nums)`` returning an operation (sum, count, list, largest,
smallest, sum of squares) over the numbers that satisfy TWO conditions (e.g. "the sum of
the even numbers greater than 3 in nums"). A *combination* is (operation, condition
type, condition type); whole combinations are held out: every condition pair loses one
operation to the test split (and every other pair one more to dev), so test asks for
combinations never seen in training, made of parts that were. The answer is a two-line
function; ``meta["tests"]`` holds input/output cases, scored by running the candidate in
a subprocess (:mod:`moa.data.sandbox`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from typing import Any

from moa.data.common import Example, make_examples, rng_for, round_robin

DOMAIN = "code"

PHRASINGS: tuple[str, ...] = (
    "Write a Python function solve(nums) that returns {desc}.",
    "Implement solve(nums) in Python: given a list of integers nums, return {desc}.",
    "Python: define solve(nums) returning {desc}.",
    "Complete the Python function solve(nums) so that it gives back {desc}.",
)
HELD_OUT: tuple[int, ...] = (3,)

SIZES = {"train": 2000, "dev": 100, "test": 250}
ENTRY_POINT = "solve"

# operation -> (description around {np}, code around {p}, function of the kept numbers)
OPS: dict[str, tuple[str, str, Callable[[list[int]], Any]]] = {
    "sum": ("the sum of {np}", "sum(x for x in nums if {p})", sum),
    "count": ("the count of {np}", "sum(1 for x in nums if {p})", len),
    "list": ("the list of {np}, in order", "[x for x in nums if {p}]", list),
    "max": ("the largest of {np}, or 0 if there is none", "max((x for x in nums if {p}), default=0)",
            lambda xs: max(xs, default=0)),
    "min": ("the smallest of {np}, or 0 if there is none", "min((x for x in nums if {p}), default=0)",
            lambda xs: min(xs, default=0)),
    "sumsq": ("the sum of the squares of {np}", "sum(x * x for x in nums if {p})", lambda xs: sum(x * x for x in xs)),
}

# condition type -> (group, words, code); {k} is the condition's parameter
CONDITIONS: dict[str, tuple[str, str, str]] = {
    "positive": ("sign", "positive", "x > 0"),
    "negative": ("sign", "negative", "x < 0"),
    "even": ("parity", "even", "x % 2 == 0"),
    "odd": ("parity", "odd", "x % 2 == 1"),
    "gt": ("compare", "greater than {k}", "x > {k}"),
    "lt": ("compare", "less than {k}", "x < {k}"),
    "div": ("divisibility", "divisible by {k}", "x % {k} == 0"),
    "ndiv": ("divisibility", "not divisible by {k}", "x % {k} != 0"),
}
_ORDER = ("sign", "parity", "compare", "divisibility")  # adjectives first, as English puts them


_REDUNDANT = {("positive", "gt"), ("negative", "lt")}  # one condition always implies the other


def condition_pairs() -> list[tuple[str, str]]:
    """The 23 condition-type pairs: two types of different groups (no redundant pair), and ``gt``+``lt``."""
    pairs = [
        tuple(sorted((a, b), key=lambda c: _ORDER.index(CONDITIONS[c][0])))
        for a, b in itertools.combinations(CONDITIONS, 2)
        if CONDITIONS[a][0] != CONDITIONS[b][0]
    ]
    return sorted(p for p in pairs if p not in _REDUNDANT) + [("gt", "lt")]


def _holds(cond: str, k: int | None, x: int) -> bool:
    return {
        "positive": lambda: x > 0, "negative": lambda: x < 0, "even": lambda: x % 2 == 0, "odd": lambda: x % 2 == 1,
        "gt": lambda: x > k, "lt": lambda: x < k, "div": lambda: x % k == 0, "ndiv": lambda: x % k != 0,
    }[cond]()


def draw_params(pair: tuple[str, str], rng: random.Random) -> list[int | None]:
    """Parameters for a pair's conditions, chosen so the two conditions can both hold."""
    a, b = pair
    if pair == ("gt", "lt"):
        lo = rng.randrange(-5, 10)
        return [lo, lo + rng.randrange(3, 12)]
    params: list[int | None] = []
    for cond in pair:
        other = b if cond == a else a
        if cond in ("gt", "lt"):
            if other == "negative":  # only "negative numbers greater than k" (k < -1)
                params.append(rng.randrange(-11, -1))
            elif other == "positive":  # only "positive numbers less than k" (k > 2)
                params.append(rng.randrange(3, 16))
            else:
                params.append(rng.randrange(-5, 13))
        elif cond in ("div", "ndiv"):
            params.append(rng.choice((3, 5, 7)) if other in ("even", "odd") else rng.randrange(3, 8))
        else:
            params.append(None)
    return params


def describe(op: str, pair: tuple[str, str], params: list[int | None]) -> tuple[str, str]:
    """The task's description and the gold function's source."""
    adjectives = [CONDITIONS[c][1] for c in pair if CONDITIONS[c][0] in ("sign", "parity")]
    posts = [CONDITIONS[c][1].format(k=k) for c, k in zip(pair, params) if CONDITIONS[c][0] not in ("sign", "parity")]
    noun = " ".join(["the", *adjectives, "numbers"])
    if len(posts) == 2:
        noun += f" {posts[0]} and {posts[1]}"
    elif posts:
        noun += f" {posts[0]}"
    desc = OPS[op][0].format(np=noun + " in nums")
    predicate = " and ".join(CONDITIONS[c][2].format(k=k) for c, k in zip(pair, params))
    source = f"def {ENTRY_POINT}(nums):\n    return {OPS[op][1].format(p=predicate)}"
    return desc, source


def expected(op: str, conds: list[tuple[str, int | None]], nums: list[int]) -> Any:
    """What the specified function returns for ``nums`` (computed directly, no exec)."""
    return OPS[op][2]([x for x in nums if all(_holds(c, k, x) for c, k in conds)])


def make_tests(op: str, conds: list[tuple[str, int | None]], rng: random.Random) -> list[list[Any]]:
    """Six ``[input, output]`` cases that tell the function from one missing either condition."""
    for _ in range(200):
        inputs = [[]] + [[rng.randrange(-12, 25) for _ in range(rng.randrange(4, 10))] for _ in range(5)]
        outs = [expected(op, conds, xs) for xs in inputs]
        hits = sum(any(all(_holds(c, k, x) for c, k in conds) for x in xs) for xs in inputs)
        discriminates = all(
            any(expected(op, [cond], xs) != out for xs, out in zip(inputs, outs)) for cond in conds
        )
        if hits >= 2 and discriminates:
            return [[xs, out] for xs, out in zip(inputs, outs)]
    raise AssertionError(f"no discriminating tests for {op} {conds}")


def held_out_combinations() -> dict[str, set[tuple[str, str, str]]]:
    """split -> its (op, condition, condition) combinations; test and dev ones are never in train.

    Pair ``i`` gives operation ``i mod 6`` (of a seeded order) to test and, for even ``i``,
    another one (cycling too) to dev, so each operation is held out about equally often.
    """
    ops = sorted(OPS)
    rng_for(DOMAIN, "combinations").shuffle(ops)
    out: dict[str, set[tuple[str, str, str]]] = {"train": set(), "dev": set(), "test": set()}
    for i, pair in enumerate(condition_pairs()):
        test_op = ops[i % len(ops)]
        dev_op = None
        if i % 2 == 0:
            j = (i // 2 + 3) % len(ops)
            dev_op = ops[j] if ops[j] != test_op else ops[(j + 1) % len(ops)]
        out["test"].add((test_op, *pair))
        if dev_op:
            out["dev"].add((dev_op, *pair))
        out["train"] |= {(op, *pair) for op in ops if op not in (test_op, dev_op)}
    return out


def generate() -> dict[str, list[Example]]:
    """Build the train/dev/test examples of the code domain (deterministic)."""
    combos = held_out_combinations()
    out: dict[str, list[Example]] = {}
    for split in ("test", "dev", "train"):
        rng = rng_for(DOMAIN, split)
        pool = [k for k in range(len(PHRASINGS)) if split == "test" or k not in HELD_OUT]
        groups = []
        for op, a, b in sorted(combos[split]):
            variants, seen = [], set()
            for attempt in range(4 * SIZES[split] // len(combos[split]) + 8):
                params = draw_params((a, b), rng)
                k = pool[attempt % len(pool)]
                desc, source = describe(op, (a, b), params)
                if (desc, k) not in seen:
                    seen.add((desc, k))
                    variants.append((op, (a, b), params, desc, source, k))
            groups.append(variants)
        rng.shuffle(groups)
        picked = round_robin(groups, SIZES[split])
        rng.shuffle(picked)
        items = []
        for op, pair, params, desc, source, k in picked:
            conds = list(zip(pair, params))
            meta = {
                "entry_point": ENTRY_POINT, "op": op, "conditions": [list(c) for c in conds],
                "combination": f"{op}|{pair[0]}+{pair[1]}", "tests": make_tests(op, conds, rng),
            }
            items.append((PHRASINGS[k].format(desc=desc), source, k, meta))
        out[split] = make_examples(DOMAIN, split, items)
    return {s: out[s] for s in ("train", "dev", "test")}
