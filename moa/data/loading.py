"""Reading the committed JSONL splits (through ``importlib.resources``, so installs work)."""

from __future__ import annotations

import functools
import importlib.resources
from typing import TYPE_CHECKING

from moa.data.common import COMPOSITE, DOMAINS, SLOTS, SPLITS, DatasetFormatError, Example, UnknownDatasetError
from moa.errors import format_choices

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; importlib.abc has it on 3.10
    from importlib.abc import Traversable


def files_root() -> Traversable:
    """The package folder holding the data files (``moa/data/files``)."""
    return importlib.resources.files("moa.data") / "files"


def split_resource(domain: str, split: str) -> Traversable:
    """The committed JSONL file of one domain split (validated names).

    Raises:
        UnknownDatasetError: Unknown domain, or a split that domain does not have.
    """
    if domain == COMPOSITE:
        if split != "test":
            raise UnknownDatasetError(f"Unknown split {split!r} of the composite set. Splits: test.")
    elif domain not in (*DOMAINS, SLOTS):
        raise UnknownDatasetError(
            f"Unknown domain {domain!r}. Domains: {format_choices(DOMAINS)} (and {SLOTS!r}, and "
            f"{COMPOSITE!r} via load_composite())."
        )
    elif split not in SPLITS:
        raise UnknownDatasetError(f"Unknown split {split!r}. Splits: {format_choices(SPLITS)}.")
    return files_root() / domain / f"{split}.jsonl"


@functools.cache
def _read(domain: str, split: str) -> tuple[Example, ...]:
    resource = split_resource(domain, split)
    if not resource.is_file():
        raise DatasetFormatError(
            f"Data file {domain}/{split}.jsonl is missing from the moa package. "
            "Regenerate it with: python -m moa.data.generate (needs pip install 'moa[data]')."
        )
    lines = resource.read_text(encoding="utf-8").splitlines()
    examples = []
    for number, line in enumerate(lines, 1):
        try:
            examples.append(Example.from_json(line))
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetFormatError(f"{domain}/{split}.jsonl line {number} is not a valid example: {exc}") from exc
    return tuple(examples)


def load_split(domain: str, split: str) -> list[Example]:
    """Load one split of a built-in domain.

    Args:
        domain: One of :data:`moa.data.DOMAINS` (``"composite"`` is accepted with ``"test"``).
        split: ``"train"``, ``"dev"`` or ``"test"``.

    Returns:
        A new list of the split's examples, in file order.

    Raises:
        UnknownDatasetError: Unknown domain or split (the message lists the choices).

    Example:
        >>> from moa.data import load_split
        >>> load_split("arithmetic", "test")[0].domain
        'arithmetic'
    """
    return list(_read(domain, split))


def load_composite() -> list[Example]:
    """Load the composite prompts (domain ``"composite"``, test only; see :mod:`moa.data.composite`)."""
    return list(_read(COMPOSITE, "test"))


def load_slots(split: str, task: str | None = None) -> list[Example]:
    """Load one split of the slot tasks (see :mod:`moa.data.slots`), optionally one task only."""
    examples = list(_read(SLOTS, split))
    if task is None:
        return examples
    chosen = [e for e in examples if e.meta["task"] == task]
    if not chosen:
        tasks = sorted({e.meta["task"] for e in examples})
        raise UnknownDatasetError(f"Unknown slot task {task!r}. Tasks: {format_choices(tasks)}.")
    return chosen
