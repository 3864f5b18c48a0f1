"""Shared pieces of the built-in datasets: the :class:`Example` record, names, errors, helpers.

Nothing here imports a generator-time dependency (num2words, babel, simple_icd_10_cm):
loading and scoring the committed data needs only the standard library.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from moa.errors import MissingDependencyError, MoaError, format_choices

DOMAINS: tuple[str, ...] = ("sql", "arithmetic", "icd", "french", "code")
"""The built-in domains, in a fixed order (one adapter each)."""

COMPOSITE = "composite"
"""Pseudo-domain of the prompts that need two domains at once (test only)."""

SLOTS = "slots"
"""Pseudo-domain of the slot tasks: answers whose segments belong to different domains."""

SPLITS: tuple[str, ...] = ("train", "dev", "test")
"""The splits every domain has."""

BASE_SEED = 20240604
"""Root of every generator's seed (each domain derives its own from it)."""

T = TypeVar("T")


class UnknownDatasetError(MoaError, KeyError):
    """A domain or split name that the built-in datasets do not have."""


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair of a built-in domain.

    Attributes:
        id: Stable identifier, ``"<domain>-<split>-<index>"``.
        domain: One of :data:`DOMAINS`, or ``"composite"``.
        prompt: The user message, without any chat template.
        answer: The exact assistant text a model should generate (short, no explanation).
        phrasing: Index of the instruction template the prompt was written with.
        split: ``"train"``, ``"dev"`` or ``"test"``.
        meta: Domain data needed to score a prediction (gold SQL and result, test cases,
            the number, ...). JSON values only.
    """

    id: str
    domain: str
    prompt: str
    answer: str
    phrasing: int
    split: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:  # ``meta`` is a dict: hash the identity fields only
        return hash((self.id, self.domain, self.split, self.prompt))

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready ``dict`` (use :meth:`to_json_line` for a string)."""
        return asdict(self)

    def to_json_line(self) -> str:
        """Return the example as one canonical JSON line (sorted keys, UTF-8, no newline)."""
        return json.dumps(self.to_json(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Example:
        """Build an example from :meth:`to_json`'s dict or from a JSON string.

        Raises:
            MoaError: ``data`` lacks a field or has an unknown one.
        """
        if isinstance(data, str):
            data = json.loads(data)
        names = {"id", "domain", "prompt", "answer", "phrasing", "split", "meta"}
        if set(data) != names:
            raise DatasetFormatError(
                f"Example JSON has fields {format_choices(data)}; expected {format_choices(names)}."
            )
        return cls(
            id=str(data["id"]),
            domain=str(data["domain"]),
            prompt=str(data["prompt"]),
            answer=str(data["answer"]),
            phrasing=int(data["phrasing"]),
            split=str(data["split"]),
            meta=dict(data["meta"]),
        )


class DatasetFormatError(MoaError, ValueError):
    """A dataset file or record that does not have the expected shape."""


# --- seeds and sampling ----------------------------------------------------------------------


def rng_for(domain: str, purpose: str = "") -> random.Random:
    """Return a ``random.Random`` seeded from :data:`BASE_SEED`, the domain and a purpose.

    Only integer seeds and ``randrange``/``choice``/``shuffle``/``sample`` are used by
    the generators, whose results are stable across CPython versions.
    """
    digest = hashlib.sha256(f"{BASE_SEED}:{domain}:{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split_values(values: Iterable[T], rng: random.Random, fractions: Sequence[float]) -> list[list[T]]:
    """Shuffle ``values`` (after sorting them by ``repr``) and cut them into consecutive parts.

    Args:
        values: The values to partition (duplicates are dropped).
        rng: The random generator to shuffle with.
        fractions: One fraction per part (e.g. test, dev, train); the last part takes the rest.

    Returns:
        One list per fraction; every part has at least one value when there are enough.
    """
    unique = sorted(set(values), key=repr)
    rng.shuffle(unique)
    parts: list[list[T]] = []
    start = 0
    for i, frac in enumerate(fractions):
        if i == len(fractions) - 1:
            end = len(unique)
        else:
            end = min(len(unique), start + max(1, round(frac * len(unique))))
        parts.append(unique[start:end])
        start = end
    return parts


def round_robin(groups: Sequence[Sequence[T]], limit: int) -> list[T]:
    """Take items from each group in turn (first of each, then second...) up to ``limit``."""
    out: list[T] = []
    depth = 0
    while len(out) < limit and any(depth < len(g) for g in groups):
        for group in groups:
            if depth < len(group) and len(out) < limit:
                out.append(group[depth])
        depth += 1
    return out


def assign_phrasings(count: int, split: str, n_phrasings: int, held_out: Sequence[int]) -> Iterator[int]:
    """Yield the phrasing index of each of ``count`` items of a split, cycling evenly.

    Train and dev cycle over the phrasings that are not held out; test cycles over all of
    them, so every held-out phrasing gets about ``count / n_phrasings`` test items.
    """
    pool = list(range(n_phrasings)) if split == "test" else [i for i in range(n_phrasings) if i not in held_out]
    for i in range(count):
        yield pool[i % len(pool)]


def make_examples(domain: str, split: str, items: Sequence[tuple[str, str, int, dict[str, Any]]]) -> list[Example]:
    """Number ``(prompt, answer, phrasing, meta)`` tuples into examples of one split."""
    return [
        Example(id=f"{domain}-{split}-{i:05d}", domain=domain, prompt=p, answer=a, phrasing=k, split=split, meta=m)
        for i, (p, a, k, m) in enumerate(items)
    ]


def require(module: str, package: str) -> Any:
    """Import a generator-time dependency, or raise a helpful :class:`MissingDependencyError`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"Regenerating the datasets needs {package!r}, which is not installed ({exc}). "
            "Install it with: pip install 'moa[data]'"
        ) from exc


# --- files -----------------------------------------------------------------------------------


def write_jsonl(examples: Iterable[Example], path: Path) -> str:
    """Write examples as canonical JSONL (``\\n`` endings) and return the file's sha256."""
    text = "".join(ex.to_json_line() + "\n" for ex in examples).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text)
    tmp.replace(path)
    return hashlib.sha256(text).hexdigest()


# --- normalisation used by the scorers ---------------------------------------------------------

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)\n?```\s*$", re.DOTALL)


def strip_code_fence(text: str) -> str:
    """Remove one surrounding Markdown code fence (```` ```sql ... ``` ````) if present."""
    match = _FENCE.match(text)
    return (match.group(1) if match else text).strip()


def normalize_text(text: str, *, casefold: bool) -> str:
    """NFC, typographic apostrophes as ``'``, collapsed whitespace, no trailing period or quotes."""
    text = unicodedata.normalize("NFC", text).replace("\u2019", "'").replace("\u00a0", " ").replace("\u202f", " ")
    text = " ".join(text.split())
    text = text.strip().strip("\"'`").strip()
    text = text.rstrip(".").rstrip()
    return text.casefold() if casefold else text
