"""Domain metrics: :func:`score` one prediction, :func:`score_many` a list (accuracy).

* ``sql``: execution accuracy. The prediction (one statement, Markdown fence allowed) and
  the gold query run on the bundled Chinook file through a read-only connection with a
  timeout; their result multisets must be equal (floats to 4 decimals). Any error: False.
* ``arithmetic``: the last number in the prediction equals the gold value.
* ``icd``: exact match of the chapter title, ignoring case, whitespace, a trailing period
  and a trailing code range such as ``(A00-B99)``.
* ``french``: exact match ignoring case, whitespace, typographic apostrophes and a trailing
  period; accents, hyphens and spelling count.
* ``code``: pass@1: the candidate must pass every case of ``meta["tests"]`` in a
  subprocess with a timeout (:mod:`moa.data.sandbox`).
* ``composite``: scored with the metric of ``meta["score_as"]``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation

from moa.data import chinook, sandbox
from moa.data.common import COMPOSITE, DOMAINS, Example, UnknownDatasetError, normalize_text, strip_code_fence
from moa.errors import MoaError, format_choices

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_CODE_RANGE = re.compile(r"\s*\(\s*[A-Za-z0-9]{3}\s*-\s*[A-Za-z0-9]{3}\s*\)\s*\.?\s*$")


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text`` (``−`` read as minus, thousands commas dropped)."""
    text = text.replace("\u2212", "-")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1])
    except InvalidOperation:  # pragma: no cover - the regex only matches valid decimals
        return None


def score_sql(example: Example, prediction: str, *, timeout: float | None = None) -> bool:
    """Execution accuracy of a predicted query against ``meta["gold_sql"]``."""
    limit = chinook.DEFAULT_TIMEOUT_S if timeout is None else timeout
    query = strip_code_fence(prediction)
    if not query:
        return False
    try:
        got = chinook.run_query(query, timeout=limit)
        want = chinook.run_query(example.meta["gold_sql"], timeout=max(limit, chinook.DEFAULT_TIMEOUT_S))
    except chinook.SqlExecutionError as exc:
        logger.debug("sql prediction failed: %s", exc)
        return False
    return chinook.result_multiset(got) == chinook.result_multiset(want)


def score_arithmetic(example: Example, prediction: str, *, timeout: float | None = None) -> bool:
    """Whether the last number in ``prediction`` equals ``meta["value"]``."""
    got = last_number(prediction)
    return got is not None and got == Decimal(str(example.meta["value"]))


def score_icd(example: Example, prediction: str, *, timeout: float | None = None) -> bool:
    """Exact (case-insensitive) match of the chapter title."""
    got = _CODE_RANGE.sub("", prediction.strip())
    return normalize_text(got, casefold=True) == normalize_text(example.answer, casefold=True)


def score_french(example: Example, prediction: str, *, timeout: float | None = None) -> bool:
    """Exact match of the French text, ignoring case, whitespace and apostrophe style."""
    return normalize_text(prediction, casefold=True) == normalize_text(example.answer, casefold=True)


def score_code(example: Example, prediction: str, *, timeout: float | None = None) -> bool:
    """pass@1: the candidate passes all of ``meta["tests"]`` in a subprocess."""
    source = strip_code_fence(prediction)
    if not source:
        return False
    return sandbox.passes_tests(
        source,
        example.meta.get("entry_point", "solve"),
        example.meta["tests"],
        timeout=sandbox.DEFAULT_TIMEOUT_S if timeout is None else timeout,
        spread_args=bool(example.meta.get("spread_args", False)),
    )


SCORERS: dict[str, Callable[..., bool]] = {
    "sql": score_sql,
    "arithmetic": score_arithmetic,
    "icd": score_icd,
    "french": score_french,
    "code": score_code,
}


def score(example: Example, prediction: str, *, timeout: float | None = None) -> bool:
    """Whether ``prediction`` is correct for ``example`` under its domain's metric.

    Args:
        example: A built-in example (any domain, or composite).
        prediction: The model's generated assistant text.
        timeout: Seconds allowed to run the prediction (SQL and code); the domain default
            when ``None``.

    Raises:
        UnknownDatasetError: ``example.domain`` (or a composite's ``score_as``) is not a domain.
    """
    domain = example.meta.get("score_as") if example.domain == COMPOSITE else example.domain
    scorer = SCORERS.get(str(domain))
    if scorer is None:
        raise UnknownDatasetError(
            f"No metric for domain {domain!r} (example {example.id!r}). "
            f"Domains: {format_choices([*DOMAINS, COMPOSITE])}."
        )
    return scorer(example, prediction, timeout=timeout)


def score_many(
    examples: Sequence[Example], predictions: Sequence[str], *, timeout: float | None = None, workers: int | None = None
) -> float:
    """Accuracy of ``predictions`` over ``examples`` (0.0 for an empty list).

    Code and SQL predictions are scored on a small thread pool (each code candidate still
    runs in its own subprocess).

    Raises:
        MoaError: The two sequences differ in length.
    """
    if len(examples) != len(predictions):
        raise MoaError(f"score_many got {len(examples)} examples but {len(predictions)} predictions; pass one each.")
    if not examples:
        return 0.0
    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        results = list(pool.map(lambda pair: score(pair[0], pair[1], timeout=timeout), zip(examples, predictions)))
    return sum(results) / len(results)
