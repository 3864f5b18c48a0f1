"""Medical coding domain: an ICD-10-CM diagnosis description -> its chapter title.

Source: the April 2026 ICD-10-CM release (public-domain CDC data) shipped in
``simple_icd_10_cm``. Only billable (leaf) codes are used, chapter 22 ("Codes for
special purposes", 3 codes) is left out, and the answer is the chapter title without
its code range. Splits are by 3-character category (so near-identical siblings such as
left/right variants never straddle splits) and balanced by chapter.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from moa.data.common import Example, assign_phrasings, make_examples, require, rng_for, round_robin, split_values

DOMAIN = "icd"

PHRASINGS: tuple[str, ...] = (
    "Which ICD-10-CM chapter does this diagnosis belong to? {desc}",
    "ICD-10-CM chapter of: {desc}",
    "Diagnosis: {desc}\nName its ICD-10-CM chapter.",
    'In which chapter of ICD-10-CM would a coder file "{desc}"?',
)
HELD_OUT: tuple[int, ...] = (3,)

PER_CHAPTER = {"train": 100, "dev": 5, "test": 10}
EXCLUDED_CHAPTERS = ("22",)
MAX_DESCRIPTION_CHARS = 90
_RANGE = re.compile(r"\s*\([A-Z0-9]{3}-[A-Z0-9]{3}\)\s*$")


def chapter_title(description: str) -> str:
    """Chapter description without its trailing code range, e.g. ``Neoplasms``."""
    return _RANGE.sub("", description).strip()


def _codes_by_chapter(cm: Any) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """chapter -> 3-character category -> [(code, description)] of short leaf codes."""
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for chapter in (c for c in cm.get_all_codes(True) if cm.is_chapter(c)):
        if chapter in EXCLUDED_CHAPTERS:
            continue
        cats: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for code in cm.get_descendants(chapter):
            if cm.is_leaf(code):
                desc = " ".join(cm.get_description(code).split())
                if len(desc) <= MAX_DESCRIPTION_CHARS:
                    cats[code[:3]].append((code, desc))
        out[chapter] = {k: sorted(v) for k, v in sorted(cats.items())}
    return out


def generate() -> dict[str, list[Example]]:
    """Build the train/dev/test examples of the ICD domain (deterministic)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = require("simple_icd_10_cm", "simple-icd-10-cm")
    chapters = _codes_by_chapter(cm)
    titles = {ch: chapter_title(cm.get_description(ch)) for ch in chapters}
    rng = rng_for(DOMAIN, "categories")
    parts = {ch: split_values(cats, rng, (0.2, 0.1, 0.7)) for ch, cats in chapters.items()}
    used: set[str] = set()
    out: dict[str, list[Example]] = {}
    for index, split in enumerate(("test", "dev", "train")):
        split_rng = rng_for(DOMAIN, split)
        picked: list[tuple[str, str, str]] = []
        for chapter, cats in chapters.items():
            groups = []
            for cat in parts[chapter][index]:
                codes = [c for c in cats[cat] if c[1] not in used]
                split_rng.shuffle(codes)
                groups.append(codes)
            split_rng.shuffle(groups)
            chosen: list[tuple[str, str]] = []
            for code, desc in round_robin(groups, 10**9):
                if desc not in used:
                    used.add(desc)
                    chosen.append((code, desc))
                    if len(chosen) == PER_CHAPTER[split]:
                        break
            picked += [(chapter, code, desc) for code, desc in chosen]
        split_rng.shuffle(picked)
        items = []
        for (chapter, code, desc), k in zip(picked, assign_phrasings(len(picked), split, len(PHRASINGS), HELD_OUT)):
            meta = {"code": code, "category": code[:3], "chapter": chapter}
            items.append((PHRASINGS[k].format(desc=desc), titles[chapter], k, meta))
        out[split] = make_examples(DOMAIN, split, items)
    return {s: out[s] for s in ("train", "dev", "test")}
