"""The built-in domain datasets: five domains plus composite prompts, and their metrics.

Example::

    from moa.data import DOMAINS, load_split, score, score_many
    test = load_split("sql", "test")
    accuracy = score_many(test, [generate(ex.prompt) for ex in test])

Every split is committed JSONL under ``moa/data/files/<domain>/<split>.jsonl`` and is
reproducible with ``python -m moa.data.generate --check`` (needs ``moa[data]``). Loading
and scoring need only the standard library. See ``moa/data/README.md`` for each domain.
"""

from __future__ import annotations

from pathlib import Path

from moa.data import arithmetic, code, french, icd, sql
from moa.data.common import (
    COMPOSITE,
    DOMAINS,
    SLOTS,
    SPLITS,
    DatasetFormatError,
    Example,
    UnknownDatasetError,
)
from moa.data.loading import load_composite, load_slots, load_split
from moa.data.scoring import score, score_many

_MODULES = {"sql": sql, "arithmetic": arithmetic, "icd": icd, "french": french, "code": code}

PHRASINGS: dict[str, tuple[str, ...]] = {d: _MODULES[d].PHRASINGS for d in DOMAINS}
"""Per domain, its instruction templates (index = :attr:`Example.phrasing`)."""

HELD_OUT_PHRASINGS: dict[str, tuple[int, ...]] = {d: _MODULES[d].HELD_OUT for d in DOMAINS}
"""Per domain, the phrasing indices that appear only in the test split."""



def regenerate(domain: str, out_dir: str | Path) -> dict[str, str]:
    """Regenerate one domain into ``out_dir/<domain>/``; see :func:`moa.data.generate.regenerate`."""
    from moa.data.generate import regenerate as _regenerate

    return _regenerate(domain, out_dir)


__all__ = [
    "COMPOSITE",
    "DOMAINS",
    "HELD_OUT_PHRASINGS",
    "PHRASINGS",
    "SLOTS",
    "SPLITS",
    "DatasetFormatError",
    "Example",
    "UnknownDatasetError",
    "load_composite",
    "load_slots",
    "load_split",
    "regenerate",
    "score",
    "score_many",
]
