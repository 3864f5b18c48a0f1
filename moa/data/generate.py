"""Regenerate the committed datasets, or check that they are reproducible.

Usage::

    python -m moa.data.generate            # rewrite moa/data/files/<domain>/<split>.jsonl
    python -m moa.data.generate --check    # regenerate into a temp dir, compare sha256s (exit 1 on mismatch)
    python -m moa.data.generate --domain sql --check
    python -m moa.data.generate --domain robust   # files/robust/<domain>/{train,dev}.jsonl (reads the others)

Generating needs the ``data`` extra (``pip install 'moa[data]'``: num2words, babel,
simple-icd-10-cm at pinned versions, since their output is the data).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from moa.data.common import COMPOSITE, DOMAINS, SLOTS, UnknownDatasetError, write_jsonl
from moa.data.loading import files_root
from moa.data.robust import ROBUST
from moa.errors import format_choices

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; importlib.abc has it on 3.10
    from importlib.abc import Traversable

logger = logging.getLogger(__name__)

GENERATED: tuple[str, ...] = (*DOMAINS, COMPOSITE, SLOTS, ROBUST)
"""Everything :func:`regenerate` can write: the domains, the composite set, the slot tasks and the
robust mixes (last: they are built from the committed files of the others)."""


def regenerate(domain: str, out_dir: str | Path) -> dict[str, str]:
    """Generate one domain with its fixed seeds and write ``out_dir/<domain>/<split>.jsonl``.

    Args:
        domain: One of :data:`GENERATED` (the domains and ``"composite"``).
        out_dir: Root folder; ``moa/data/files`` rewrites the committed data.

    Returns:
        split -> sha256 of the written file (``"<domain>/<split>"`` for the robust mixes, whose
        files are ``out_dir/robust/<domain>/<split>.jsonl``).

    Raises:
        UnknownDatasetError: Unknown domain.
        MissingDependencyError: A generator-time package (``moa[data]``) is not installed.
    """
    if domain not in GENERATED:
        raise UnknownDatasetError(f"Unknown domain {domain!r}. Domains: {format_choices(GENERATED)}.")
    module = importlib.import_module(f"moa.data.{domain}")
    splits = module.generate()
    folder = Path(out_dir) / domain
    hashes = {split: write_jsonl(examples, folder / f"{split}.jsonl") for split, examples in splits.items()}
    logger.info("%s: %s", domain, ", ".join(f"{s}={len(e)}" for s, e in splits.items()))
    return hashes


def committed_hashes(domain: str) -> dict[str, str]:
    """split -> sha256 of the committed files of ``domain`` (missing files are left out).

    Files in subfolders (the robust mixes' ``robust/<domain>/<split>.jsonl``) are keyed
    ``"<subfolder>/<split>"``, as :func:`regenerate` returns them.
    """
    out: dict[str, str] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".jsonl"):
                out[prefix + entry.name[: -len(".jsonl")]] = hashlib.sha256(entry.read_bytes()).hexdigest()

    folder = files_root() / domain
    if folder.is_dir():
        walk(folder, "")
    return out


def check(domains: tuple[str, ...] = GENERATED) -> list[str]:
    """Regenerate ``domains`` into a temporary folder and compare with the committed files.

    Returns:
        ``"<domain>/<split>.jsonl"`` of every file that differs, is missing or is extra.
    """
    mismatches = []
    with tempfile.TemporaryDirectory(prefix="moa-data-") as tmp:
        for domain in domains:
            fresh = regenerate(domain, tmp)
            committed = committed_hashes(domain)
            for split in sorted(set(fresh) | set(committed)):
                if fresh.get(split) != committed.get(split):
                    mismatches.append(f"{domain}/{split}.jsonl")
    return mismatches


def main(argv: list[str] | None = None) -> int:
    """Command line: regenerate (default) or ``--check`` the committed datasets."""
    parser = argparse.ArgumentParser(prog="python -m moa.data.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare a fresh generation with the committed files")
    parser.add_argument("--domain", action="append", choices=GENERATED, help="only this domain (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of the package (not with --check)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    domains = tuple(args.domain or GENERATED)
    if args.check:
        mismatches = check(domains)
        if mismatches:
            print("Regenerated data differs from the committed files:", *mismatches, sep="\n  ")
            print("Check the pinned versions of the 'data' extra, or regenerate and commit.")
            return 1
        print(f"OK: {len(domains)} domain(s) reproduce the committed files.")
        return 0
    out = args.out or Path(__file__).parent / "files"
    for domain in domains:
        for split, digest in regenerate(domain, out).items():
            print(f"{domain}/{split}.jsonl  {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
