"""French domain: numbers in words, dates and country names -> French text.

Three kinds of item, all produced by running the libraries (the answers are their output):

* ``number``: an integer 0-999999 -> words (``num2words(n, lang="fr")``, e.g.
  ``quatre-vingt-onze``); about half the items.
* ``date``: an ISO date 1900-2099 -> the French long date (``babel.dates.format_date(d,
  "long", locale="fr")``, e.g. ``14 juillet 2023``); about a quarter.
* ``country``: an English country/territory name -> its French name (CLDR via babel,
  e.g. ``Germany`` -> ``Allemagne``); about a quarter. Names that are identical in both
  languages are left out.

Numbers, dates and countries are split by value (no test value in train). Scoring is an
exact match after normalising whitespace, apostrophes and a trailing period, ignoring
case: spelling, accents and hyphens count, capitals do not (``allemagne`` passes).
"""

from __future__ import annotations

import datetime
import random
from typing import Any

from moa.data.common import Example, make_examples, require, rng_for, split_values

DOMAIN = "french"

PHRASINGS: tuple[str, ...] = (
    "Write {item} in French.",
    "How do you say {item} in French?",
    "Translate {item} into French.",
    "Give the French wording for {item}.",
)
HELD_OUT: tuple[int, ...] = (3,)

# split -> (numbers, dates, countries)
SIZES = {"test": (130, 55, 35), "dev": (55, 27, 18), "train": (1150, 500, 350)}
_NUMBER_RANGES = ((0, 101, 4), (101, 1000, 3), (1000, 10000, 2), (10000, 1000000, 1))  # (lo, hi, weight)
_NOT_COUNTRIES = {"EU", "EZ", "UN", "QO", "ZZ", "AQ", "IC", "EA", "DG", "CP", "TA", "AC"}


def number_words(n: int) -> str:
    """``n`` in French words (num2words)."""
    return require("num2words", "num2words").num2words(n, lang="fr")


def french_date(day: datetime.date) -> str:
    """``day`` as a French long date (babel/CLDR), e.g. ``1 juillet 2023``."""
    return require("babel.dates", "babel").format_date(day, format="long", locale="fr")


def country_names() -> list[tuple[str, str, str]]:
    """(ISO code, English name, French name) of countries whose names differ, sorted by code."""
    locale = require("babel", "babel").Locale
    en, fr = locale("en").territories, locale("fr").territories
    return [
        (code, en[code], fr[code])
        for code in sorted(en)
        if len(code) == 2 and code.isalpha() and not code.startswith("X") and code not in _NOT_COUNTRIES
        and code in fr and en[code] != fr[code]
    ]


def _draw_number(rng: random.Random) -> int:
    weights = [w for _, _, w in _NUMBER_RANGES]
    pick = rng.randrange(sum(weights))
    for lo, hi, weight in _NUMBER_RANGES:
        if pick < weight:
            return rng.randrange(lo, hi)
        pick -= weight
    raise AssertionError("unreachable")


def _draw_date(rng: random.Random) -> datetime.date:
    start = datetime.date(1900, 1, 1).toordinal()
    return datetime.date.fromordinal(rng.randrange(start, datetime.date(2099, 12, 31).toordinal() + 1))


def _draw_keyed(
    draw: Any, rng: random.Random, count: int, forbidden: set[Any], pool: list[int], *, budget: int = 200
) -> list[tuple[Any, int]]:
    """Draw ``count`` (value, phrasing) pairs, phrasings cycling over ``pool``.

    Values in ``forbidden`` (other splits') are never taken. A value repeats inside the
    split (with another phrasing) only after ``budget`` draws in a row found no new one.
    """
    out: list[tuple[Any, int]] = []
    values: set[Any] = set()
    misses = 0
    while len(out) < count:
        value, k = draw(rng), pool[len(out) % len(pool)]
        if value in forbidden or (value, k) in out:
            continue
        if value in values and misses < budget:
            misses += 1
            continue
        misses = 0
        values.add(value)
        out.append((value, k))
    forbidden |= values
    return out


def _phrasing_pool(split: str) -> list[int]:
    return [k for k in range(len(PHRASINGS)) if split == "test" or k not in HELD_OUT]


def generate() -> dict[str, list[Example]]:
    """Build the train/dev/test examples of the French domain (deterministic)."""
    rng = rng_for(DOMAIN, "countries")
    country_parts = split_values(country_names(), rng, (0.2, 0.1, 0.7))
    numbers_taken: set[int] = set()
    dates_taken: set[datetime.date] = set()
    out: dict[str, list[Example]] = {}
    for index, split in enumerate(("test", "dev", "train")):
        split_rng = rng_for(DOMAIN, split)
        pool = _phrasing_pool(split)
        n_num, n_date, n_country = SIZES[split]
        raw: list[tuple[str, str, int, dict[str, Any]]] = []
        for n, k in _draw_keyed(_draw_number, split_rng, n_num, numbers_taken, pool):
            raw.append((f"the number {n}", number_words(n), k, {"kind": "number", "value": n}))
        for day, k in _draw_keyed(_draw_date, split_rng, n_date, dates_taken, pool):
            answer = french_date(day)
            raw.append((f"the date {day.isoformat()}", answer, k, {"kind": "date", "value": day.isoformat()}))
        countries = country_parts[index]
        for i in range(min(n_country, len(countries) * len(pool))):
            code, english, french = countries[i % len(countries)]
            k = pool[(i % len(countries) + i // len(countries)) % len(pool)]
            raw.append((f"the country name {english}", french, k, {"kind": "country", "value": code}))
        split_rng.shuffle(raw)
        items = [(PHRASINGS[k].format(item=item), answer, k, meta) for item, answer, k, meta in raw]
        out[split] = make_examples(DOMAIN, split, items)
    return {s: out[s] for s in ("train", "dev", "test")}
