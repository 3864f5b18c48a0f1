"""The curated registry: schemas, shipped entries, the generated page, pin verification."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moa.errors import RegistryError
from moa.hub import push_adapter
from moa.hub.directory import default_page_path, render_directory_page
from moa.hub.registry import load_registry, resolve, verify_registry
from tests.hub.conftest import add_lora, go_offline, go_online

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_shipped_registry_is_valid():
    registry = load_registry()
    assert registry.root == REPO_ROOT / "registry"
    example = registry.plugins["example"]
    assert example.package == "moa-plugin-example" and example.provides == {"routers": ["round_robin"]}
    assert all(p.moa_versions == ">=0.1,<0.2" and p.compatible() for p in registry.plugins.values())


def test_directory_page_is_up_to_date():
    page = default_page_path()
    assert page == REPO_ROOT / "docs" / "directory.md"
    assert page.read_text() == render_directory_page(), (
        "docs/directory.md is stale: regenerate it with 'moa registry render --write' "
        "(or python -m moa.hub.directory) and commit it."
    )


def test_every_plugin_package_here_is_registered_and_matches():
    registry = load_registry()
    by_source = {p.source: p for p in registry.plugins.values()}
    results = {r.name: r for r in verify_registry(offline_ok=True) if r.kind == "plugin"}
    for pyproject in sorted(REPO_ROOT.glob("plugins/*/pyproject.toml")):
        source = f"plugins/{pyproject.parent.name}"
        assert source in by_source, f"{source} has no entry in registry/plugins/"
        result = results[by_source[source].name]
        assert result.status == "ok", f"registry entry of {source}: {result.message}"


def make_registry(tmp_path: Path, adapters: dict[str, str] = (), plugins: dict[str, str] = ()) -> Path:
    """A registry folder with the real schemas and the given TOML entries (name -> text)."""
    root = tmp_path / "registry"
    shutil.copytree(REPO_ROOT / "registry" / "schema", root / "schema")
    for kind, entries in (("adapters", adapters), ("plugins", plugins)):
        (root / kind).mkdir(parents=True)
        for name, text in dict(entries).items():
            (root / kind / f"{name}.toml").write_text(text)
    return root


def adapter_toml(name: str, repo: str, revision: str, files: dict[str, str], fingerprint: str) -> str:
    lines = "\n".join(f'"{n}" = "{d}"' for n, d in sorted(files.items()))
    return (f'name = "{name}"\nrepo = "{repo}"\nrevision = "{revision}"\nadapter_type = "lora"\n'
            f'domains = ["sql"]\nlicense = "apache-2.0"\n\n[base]\nmodel_id = "tiny"\n'
            f'fingerprint = "{fingerprint}"\nquantization = "none"\n\n[files]\n{lines}\n\n[metrics]\nacc = 0.5\n')


def test_invalid_entries_are_all_reported(tmp_path):
    bad_adapter = adapter_toml("x", "alice/x", "main", {"adapter_model.bin": "0" * 64}, "0" * 24)
    bad_plugin = ('name = "other"\npackage = "p"\ndescription = "d"\nlicense = "MIT"\nmoa_versions = "0.1"\n'
                  '[entry_point]\ngroup = "moa"\nname = "p"\nvalue = "p.plugin"\n[provides]\nrouters = ["r"]\n')
    root = make_registry(tmp_path, {"x": bad_adapter}, {"p": bad_plugin, "broken": "name = "})
    with pytest.raises(RegistryError) as info:
        load_registry(root)
    message = str(info.value)
    assert "adapters/x.toml/revision: 'main' does not match" in message
    assert "missing required property 'adapter_config.json'" in message
    assert "property name 'adapter_model.bin'" in message
    assert "plugins/p.toml/moa_versions" in message and "plugins/broken.toml: not valid TOML" in message


def test_name_must_match_file_and_unknown_names_list_choices(tmp_path):
    plugin = ('name = "q"\npackage = "p"\ndescription = "d"\nlicense = "MIT"\nmoa_versions = ">=0.1"\n'
              '[entry_point]\ngroup = "moa"\nname = "p"\nvalue = "p.plugin"\n[provides]\nrouters = ["r"]\n')
    with pytest.raises(RegistryError, match="must equal the file name 'p'"):
        load_registry(make_registry(tmp_path / "a", plugins={"p": plugin}))
    registry = load_registry(make_registry(tmp_path / "b", adapters={
        "sql": adapter_toml("sql", "alice/sql", "a" * 40, {"adapter_config.json": "0" * 64,
                                                           "adapter_model.safetensors": "1" * 64}, "0" * 24)}))
    assert resolve("sql", registry).repo == "alice/sql"
    with pytest.raises(RegistryError, match="Registered: sql"):
        resolve("sqll", registry)


def test_verify_checks_every_pin_against_the_hub_or_cache(hub, tiny_model, tmp_path, monkeypatch):
    add_lora(tiny_model, "sql", seed=21)
    pushed = push_adapter(tiny_model, "sql", "alice/reg-sql")
    text = adapter_toml("sql", "alice/reg-sql", pushed.oid, pushed.files, tiny_model.base_fingerprint)
    root = make_registry(tmp_path, {"sql": text})
    assert [(r.name, r.status) for r in verify_registry(root, cache_dir=hub.cache_dir)] == [("sql", "ok")]

    go_offline(monkeypatch)  # cached now: verified from the cache; an empty cache: skipped, or failed if strict
    assert verify_registry(root, cache_dir=hub.cache_dir)[0].status == "cached"
    assert verify_registry(root, cache_dir=tmp_path / "empty")[0].status == "skipped"
    assert verify_registry(root, cache_dir=tmp_path / "empty", offline_ok=False)[0].status == "failed"
    go_online(monkeypatch)

    entry = hub.storage.resolve("alice/reg-sql", "main").files["adapter_model.safetensors"]
    data = bytearray(hub.storage.blobs[entry.blob_key])
    data[-2] ^= 0x10
    hub.storage.tamper("alice/reg-sql", "adapter_model.safetensors", bytes(data))
    result = verify_registry(root, cache_dir=tmp_path / "fresh-cache")[0]
    assert result.status == "failed" and "tampered" in result.message
