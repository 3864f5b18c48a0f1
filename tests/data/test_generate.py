"""Regeneration reproduces the committed files byte for byte (what CI's hash check relies on)."""

from __future__ import annotations

import hashlib

import pytest

from moa.data import UnknownDatasetError, regenerate
from moa.data import generate as gen


@pytest.mark.parametrize("domain", gen.GENERATED)
def test_regeneration_matches_committed_hashes(domain, tmp_path):
    hashes = regenerate(domain, tmp_path)
    assert hashes == gen.committed_hashes(domain)
    for split, digest in hashes.items():
        assert hashlib.sha256((tmp_path / domain / f"{split}.jsonl").read_bytes()).hexdigest() == digest


def test_check_reports_mismatches(monkeypatch, capsys):
    monkeypatch.setattr(gen, "committed_hashes", lambda domain: {"train": "0" * 64, "dev": "1" * 64})
    assert gen.check(("arithmetic",)) == ["arithmetic/dev.jsonl", "arithmetic/test.jsonl", "arithmetic/train.jsonl"]
    assert gen.main(["--check", "--domain", "arithmetic"]) == 1
    assert "arithmetic/train.jsonl" in capsys.readouterr().out


def test_unknown_domain(tmp_path):
    with pytest.raises(UnknownDatasetError, match="composite"):
        regenerate("weather", tmp_path)
