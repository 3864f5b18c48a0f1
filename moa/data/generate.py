"""Regenerate the committed datasets, or check that they are reproducible.

Usage::

    python -m moa.data.generate            # rewrite moa/data/files/<domain>/<split>.jsonl
    python -m moa.data.generate --check    # regenerate into a temp dir, compare sha256s (exit 1 on mismatch)
    python -m moa.data.generate --domain sql --check

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

from moa.data.common import COMPOSITE, DOMAINS, SLOTS, UnknownDatasetError, write_jsonl
from moa.data.loading import files_root
from moa.errors import format_choices

logger = logging.getLogger(__name__)

GENERATED: tuple[str, ...] = (*DOMAINS, COMPOSITE, SLOTS)
"""Everything :func:`regenerate` can write: the domains, the composite set and the slot tasks."""


def regenerate(domain: str, out_dir: str | Path) -> dict[str, str]:
    """Generate one domain with its fixed seeds and write ``out_dir/<domain>/<split>.jsonl``.

    Args:
        domain: One of :data:`GENERATED` (the domains and ``"composite"``).
        out_dir: Root folder; ``moa/data/files`` rewrites the committed data.

    Returns:
        split -> sha256 of the written file.

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
    """split -> sha256 of the committed file of ``domain`` (missing files are left out)."""
    folder = files_root() / domain
    out = {}
    for name in ("train", "dev", "test"):
        resource = folder / f"{name}.jsonl"
        if resource.is_file():
            out[name] = hashlib.sha256(resource.read_bytes()).hexdigest()
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
