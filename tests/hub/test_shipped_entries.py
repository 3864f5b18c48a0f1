"""Shipped registry entries: adapters inside the moa package (``source``), verified and pulled offline.

Fast: no model is loaded and nothing touches the network. Tampering happens on a copy of a
demo adapter in a fake installed package (``moa.__file__`` pointed at a tmp folder), never on
the real ``moa/demo_adapters``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import moa
from moa.cli import main
from moa.errors import IntegrityError, RegistryError
from moa.hub.pull import fetch_shipped, pull_registered, shipped_folder
from moa.hub.registry import (
    load_registry,
    render_shipped_entries,
    resolve,
    sync_shipped_entries,
    verify_registry,
)
from moa.hub.schema_check import validate
from moa.hub.verify import sha256_file
from tests.hub.test_registry import REPO_ROOT, make_registry

DEMO = Path(moa.__file__).resolve().parent / "demo_adapters"
DOMAINS = ("arithmetic", "code", "french", "icd", "sql")
SQL_TOML = (REPO_ROOT / "registry" / "adapters" / "sql.toml").read_text()
HEX = {"adapter_config.json": "0" * 64, "adapter_model.safetensors": "1" * 64}


def fake_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, domains: tuple[str, ...] = ("sql",)) -> Path:
    """A copy of some demo adapters in a fake installed ``moa`` package; ``moa.__file__`` points there."""
    package = tmp_path / "site-packages" / "moa"
    for domain in domains:
        shutil.copytree(DEMO / domain, package / "demo_adapters" / domain)
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(moa, "__file__", str(package / "__init__.py"))
    return package / "demo_adapters"


def test_schema_checker_one_of_and_not():
    schema = {"type": "object", "oneOf": [
        {"title": "A", "required": ["a"], "not": {"description": "also have 'b'", "required": ["b"]}},
        {"title": "B", "required": ["b"]},
    ]}
    assert validate({"a": 1}, schema) == [] and validate({"b": 1}, schema) == []
    assert validate({"a": 1, "b": 2}, schema) == []  # A's `not` excludes it: only B matches
    neither = validate({}, schema)
    assert neither == [("/: matches none of the allowed forms (A: missing required property 'a'; "
                        "B: missing required property 'b')")]
    both = validate(1, {"oneOf": [{"type": "integer"}, {"type": "number"}]})
    assert both == ["/: 1 matches more than one of the allowed forms (form 1, form 2)"]
    assert validate({"x": 1}, {"not": {"required": ["x"]}}) == ["/: must not match {'required': ['x']}"]


def adapter_entry(name: str, **fields: str) -> str:
    """A minimal adapter entry with the given top-level string fields (repo, revision, source)."""
    head = "".join(f'{key} = "{value}"\n' for key, value in fields.items())
    pins = "".join(f'"{n}" = "{d}"\n' for n, d in HEX.items())
    return (f'name = "{name}"\n{head}adapter_type = "lora"\ndomains = ["sql"]\nlicense = "apache-2.0"\n'
            f'[base]\nmodel_id = "m"\nfingerprint = "{"0" * 24}"\n[files]\n{pins}')


def test_schema_accepts_hub_and_shipped_entries_and_rejects_both_or_neither(tmp_path):
    registry = load_registry(make_registry(tmp_path / "ok", {
        "hub": adapter_entry("hub", repo="alice/sql", revision="a" * 40),
        "shipped": adapter_entry("shipped", source="moa/demo_adapters/sql"),
    }))
    hub, shipped = registry.adapters["hub"], registry.adapters["shipped"]
    assert not hub.is_shipped and hub.location == "alice/sql@aaaaaaaaaaaa" and hub.source is None
    assert shipped.is_shipped and shipped.repo is None and shipped.revision is None
    assert shipped.location == "shipped: moa/demo_adapters/sql"

    bad = {
        "both": adapter_entry("both", repo="alice/sql", revision="a" * 40, source="moa/demo_adapters/sql"),
        "neither": adapter_entry("neither"),
        "half": adapter_entry("half", repo="alice/sql", source="moa/demo_adapters/sql"),
        "dotdot": adapter_entry("dotdot", source="moa/../etc"),
        "outside": adapter_entry("outside", source="plugins/moa-dora"),
    }
    with pytest.raises(RegistryError) as info:
        load_registry(make_registry(tmp_path / "bad", bad))
    message = str(info.value)
    assert ("adapters/both.toml/: matches none of the allowed forms (Hub entry (repo + revision): must not also "
            "have 'source'; shipped entry (source): must not also have 'repo' or 'revision')") in message
    assert ("adapters/neither.toml/: matches none of the allowed forms (Hub entry (repo + revision): missing "
            "required property 'repo', missing required property 'revision'; shipped entry (source): missing "
            "required property 'source')") in message
    assert "adapters/half.toml/: matches none" in message
    assert "adapters/dotdot.toml/source: 'moa/../etc' does not match" in message
    assert "adapters/outside.toml/source: 'plugins/moa-dora' does not match" in message


def test_shipped_entries_are_up_to_date_with_the_manifest():
    stale = sync_shipped_entries(write=False)
    assert stale == [], (
        f"registry/adapters/ is stale relative to moa/demo_adapters/manifest.json ({stale}): run "
        f"'moa registry sync-shipped' and 'moa registry render --write', and commit the changes."
    )
    manifest = json.loads((DEMO / "manifest.json").read_text())
    registry = load_registry()
    assert sorted(render_shipped_entries()) == list(DOMAINS)
    for domain in DOMAINS:
        entry = registry.adapters[domain]
        assert entry.source == f"moa/demo_adapters/{domain}" and entry.domains == [domain]
        assert entry.files == {k.split("/", 1)[1]: v for k, v in manifest["files"].items()
                               if k.startswith(f"{domain}/")}
        assert entry.base_fingerprint == manifest["base_fingerprint"]
        assert entry.quantization == manifest["quantization"]
        assert entry.metrics == {"dev_accuracy": manifest["metrics"][domain]["dev_accuracy"]}


def test_sync_writes_missing_and_stale_entries_and_drops_removed_ones(tmp_path):
    root = make_registry(tmp_path, {"sql": SQL_TOML.replace("0.8125", "0.5"),
                                    "gone": adapter_entry("gone", source="moa/demo_adapters/gone"),
                                    "hub": adapter_entry("hub", repo="alice/sql", revision="a" * 40)})
    changes = sync_shipped_entries(root, write=False)
    assert "adapters/sql.toml: stale" in changes and "adapters/code.toml: missing" in changes
    assert "adapters/gone.toml: not in the manifest" in changes and (root / "adapters" / "gone.toml").exists()
    assert sync_shipped_entries(root) == changes
    assert sync_shipped_entries(root, write=False) == []
    assert sorted(p.stem for p in (root / "adapters").glob("*.toml")) == sorted([*DOMAINS, "hub"])
    assert (root / "adapters" / "sql.toml").read_text() == SQL_TOML


def test_the_real_shipped_entries_verify_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network needed (and none used)
    results = {r.name: r for r in verify_registry(offline_ok=False) if r.kind == "adapter"}
    assert sorted(results) == list(DOMAINS)
    for name, result in results.items():
        assert result.status == "ok", result.message
        assert result.message == f"moa/demo_adapters/{name} (shipped with moa, 4 files)"


def test_verify_resolves_source_against_the_installed_package_and_names_tampered_files(tmp_path, monkeypatch):
    entry = resolve("sql", load_registry())
    root = make_registry(tmp_path, {"sql": SQL_TOML})
    demo = fake_install(tmp_path, monkeypatch)
    assert shipped_folder("moa/demo_adapters/sql") == demo / "sql"
    assert [(r.name, r.status) for r in verify_registry(root) if r.kind == "adapter"] == [("sql", "ok")]

    weights = demo / "sql" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    (demo / "sql" / "moa.json").unlink()
    (demo / "sql" / "notes.txt").write_text("extra")
    result = verify_registry(root)[0]
    assert result.status == "failed"
    pinned = entry.files["adapter_model.safetensors"]
    assert f"'adapter_model.safetensors' has sha256 {sha256_file(weights)}, pinned {pinned}" in result.message
    assert f"'moa.json' is missing (pinned sha256 {entry.files['moa.json']})" in result.message
    assert f"'notes.txt' is not pinned (sha256 {sha256_file(demo / 'sql' / 'notes.txt')})" in result.message
    assert "reinstall moa" in result.message and "moa registry sync-shipped" in result.message

    shutil.rmtree(demo / "sql")
    result = verify_registry(root)[0]
    assert result.status == "failed" and "is not in the installed moa package" in result.message


def test_pull_of_a_shipped_entry_gives_the_pinned_files(tmp_path, capsys):
    entry = resolve("sql")
    assert pull_registered("sql") == DEMO / "sql"  # no out: the verified folder inside the package
    out = pull_registered("sql", out=tmp_path / "sql")
    assert out == tmp_path / "sql"
    assert {p.name: sha256_file(p) for p in out.iterdir()} == entry.files

    assert main(["pull", "sql", "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert "verified shipped adapter sql (moa/demo_adapters/sql, 4 files, no download)" in printed
    assert {p.name: sha256_file(p) for p in (tmp_path / "cli").iterdir()} == entry.files
    assert main(["pull", "sql", "--revision", "v1"]) == 1
    assert "shipped with moa (moa/demo_adapters/sql); drop --revision" in capsys.readouterr().err


def test_pull_of_a_tampered_shipped_adapter_copies_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_REGISTRY", str(make_registry(tmp_path, {"sql": SQL_TOML})))
    demo = fake_install(tmp_path, monkeypatch)
    (demo / "sql" / "adapter_config.json").write_text("{}")
    with pytest.raises(IntegrityError, match="'adapter_config.json' has sha256 [0-9a-f]{64}, pinned 177e60"):
        pull_registered("sql", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RegistryError, match="must be a folder inside the moa package"):
        fetch_shipped("moa/../x", pinned=HEX)
