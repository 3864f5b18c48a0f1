"""Property-based fuzzing of every JSON/TOML file moa reads (see tests/reliability/fuzzing.py).

Each test damages one valid file (one field replaced, deleted or added; or its bytes truncated,
flipped or replaced) and checks the property: it loads and works, or it raises a MoaError
naming the file and the field, and nothing changed (the model, the folder).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moa.errors import AdapterConfigError, ManifestError, MoaError, RegistryError
from moa.hub.manifest import MixtureManifest
from moa.hub.registry import load_registry, registry_root, render_shipped_entries, resolve
from moa.hub.schema_check import validate
from moa.routing.learned_gate import LearnedGate
from tests.reliability.fuzzing import (
    damaged_text,
    dump_json,
    expect_clean,
    field_name,
    folder_digest,
    fresh_copy,
    fuzz_settings,
    model_state,
    mutated_json,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.timeout(300)

HEX = "0123456789abcdef"


def file_content(draw: st.DrawFn, doc: object) -> tuple[bytes, str | None]:
    """A damaged version of ``doc``'s JSON text: ``(bytes, the field changed or None)``."""
    if draw(st.integers(0, 3)) == 0:  # one in four: damage the bytes, not a field
        return draw(damaged_text(dump_json(doc))), None
    new, path = draw(mutated_json(doc))
    return dump_json(new).encode(), field_name(path)


def load_and_use(model, folder: Path) -> None:
    """Load ``folder`` as adapter 'new'; run it on one row; unload it (the model is as before)."""
    model.load_adapter(folder, adapter_name="new")
    try:
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3]]), adapter_names=["new"]).logits
        assert logits.shape == (1, 3, 258)
    finally:
        model.delete_adapter("new")


# --- adapter folders: adapter_config.json and moa.json --------------------------------------


@pytest.mark.parametrize("file_name", ["adapter_config.json", "moa.json"])
@given(data=st.data())
@fuzz_settings(ci_examples=500)
def test_fuzz_adapter_folder_json(fuzz_model, adapter_template, file_name, data):
    folder = fresh_copy(adapter_template)
    doc = json.loads((folder / file_name).read_text())
    content, field = file_content(data.draw, doc)
    (folder / file_name).write_bytes(content)
    before_files = folder_digest(folder)
    before_model = model_state(fuzz_model)
    try:
        load_and_use(fuzz_model, folder)
    except Exception as error:  # noqa: BLE001 - the property: only MoaError may come out
        assert isinstance(error, MoaError), f"{type(error).__name__} leaked for {content[:300]!r}: {error!r}"
        assert file_name in str(error) or str(folder) in str(error), str(error)
        if isinstance(error, AdapterConfigError) and field and field in doc:
            assert field in str(error), f"field {field!r} not named: {error}"
    assert model_state(fuzz_model) == before_model
    assert folder_digest(folder) == before_files
    shutil.rmtree(folder.parent)


# --- router_config.json of every router type ----------------------------------------------


def _gate_template(root: Path) -> Path:
    torch.manual_seed(0)
    return LearnedGate(["good"], hidden_size=64, hidden_layer=2, mlp_hidden=8).save(root / "gate")


def _keyword_template(root: Path) -> Path:
    from moa_router_keyword import KeywordRouter

    router = KeywordRouter([(r"\bselect\b", {"good": 1.0})], default={"good": 0.5}, normalize=True)
    return router.save(root / "keyword")


def _embedding_template(root: Path) -> Path:
    from moa_router_embedding import EmbeddingRouter

    torch.manual_seed(0)
    return EmbeddingRouter({"good": torch.randn(64)}, hidden_layer=2).save(root / "embedding")


def _router_class(kind: str):
    if kind == "learned_gate":
        return LearnedGate
    if kind == "keyword":
        from moa_router_keyword import KeywordRouter

        return KeywordRouter
    from moa_router_embedding import EmbeddingRouter

    return EmbeddingRouter


ROUTER_TEMPLATES = {"learned_gate": _gate_template, "keyword": _keyword_template, "embedding": _embedding_template}


@pytest.fixture(scope="module")
def router_templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("routers")
    return {kind: make(root) for kind, make in ROUTER_TEMPLATES.items()}


@pytest.mark.parametrize("kind", sorted(ROUTER_TEMPLATES))
@given(data=st.data())
@fuzz_settings(ci_examples=300)
def test_fuzz_router_config(fuzz_model, router_templates, kind, data):
    folder = fresh_copy(router_templates[kind])
    doc = json.loads((folder / "router_config.json").read_text())
    content, field = file_content(data.draw, doc)
    (folder / "router_config.json").write_bytes(content)
    before_files = folder_digest(folder)
    router = expect_clean(lambda: _router_class(kind).load(folder), ("router_config.json", str(folder)), None,
                          lambda: folder_digest(folder))
    if router is not None:  # it loaded: it must work on the model, or refuse with a MoaError
        before_model = model_state(fuzz_model)
        try:
            fuzz_model.route(["select the rows"], router=router)
        except MoaError:
            pass
        assert model_state(fuzz_model) == before_model
    assert folder_digest(folder) == before_files
    del field
    shutil.rmtree(folder.parent)


# --- the mixture manifest (moa_mixture.json) -------------------------------------------------

MANIFEST = {
    "format": "moa-mixture", "format_version": 1, "moa_version": "0.1.0",
    "base": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "fingerprint": "a98726e2be2f8aed53d50129",
             "quantization": "nf4"},
    "adapters": [
        {"name": "sql", "repo": "alice/sql-lora", "revision": "a" * 40, "adapter_type": "lora",
         "files": {"adapter_config.json": "b" * 64, "adapter_model.safetensors": "c" * 64}},
        {"name": "code", "repo": "alice/code-lora", "revision": "d" * 40, "adapter_type": "lora",
         "files": {"adapter_config.json": "e" * 64, "adapter_model.safetensors": "f" * 64}},
    ],
    "router": {"repo": "alice/gate", "revision": "1" * 40, "router_type": "learned_gate",
               "files": {"router_config.json": "2" * 64, "router.safetensors": "3" * 64}},
}


@given(data=st.data())
@fuzz_settings(ci_examples=1000)
def test_fuzz_mixture_manifest(data):
    content, field = file_content(data.draw, MANIFEST)
    try:
        manifest = MixtureManifest.from_json(content.decode("utf-8", "replace"), "alice/mix/moa_mixture.json")
    except Exception as error:  # noqa: BLE001
        assert isinstance(error, ManifestError), f"{type(error).__name__} leaked for {content[:300]!r}: {error!r}"
        assert "moa_mixture.json" in str(error)
        if field and field in json.dumps(MANIFEST) and not field.isdigit():
            assert field in str(error) or "document" in str(error), f"field {field!r} not named: {error}"
        return
    again = MixtureManifest.from_json(manifest.to_json())  # a parsed manifest round-trips
    assert again.to_dict() == manifest.to_dict()
    assert all(len(pin.revision) == 40 and set(pin.revision) <= set(HEX) for pin in manifest.adapters)


# --- registry entries (registry/adapters/*.toml) ----------------------------------------------


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory):
    """A registry folder: the real schemas and one real adapter entry (sql)."""
    real = registry_root()
    root = tmp_path_factory.mktemp("registry") / "registry"
    shutil.copytree(real / "schema", root / "schema")
    (root / "adapters").mkdir()
    (root / "plugins").mkdir()
    shutil.copy(real / "adapters" / "sql.toml", root / "adapters" / "sql.toml")
    return root


@given(data=st.data())
@fuzz_settings(ci_examples=250)
def test_fuzz_registry_entry(registry_template, data):
    import tomli_w

    root = fresh_copy(registry_template)
    entry = root / "adapters" / "sql.toml"
    doc = tomllib.loads(entry.read_text())
    field = None
    if data.draw(st.integers(0, 3)) == 0:
        content = data.draw(damaged_text(entry.read_text()))
    else:
        new, path = data.draw(mutated_json(doc))
        field = field_name(path)
        try:
            content = tomli_w.dumps(new).encode() if isinstance(new, dict) else json.dumps(new).encode()
        except (TypeError, ValueError):  # None, or a value TOML cannot write: write it as JSON text
            content, field = json.dumps(new, default=str).encode(), None
    entry.write_bytes(content)
    before = folder_digest(root)
    try:
        registry = load_registry(root)
        resolve("sql", registry)
    except Exception as error:  # noqa: BLE001
        assert isinstance(error, RegistryError), f"{type(error).__name__} leaked for {content[:300]!r}: {error!r}"
        assert "sql.toml" in str(error)
        if field and field in doc:
            assert field in str(error), f"field {field!r} not named: {error}"
    assert folder_digest(root) == before
    shutil.rmtree(root.parent)


# --- the shipped manifest (moa/demo_adapters/manifest.json) ----------------------------------


@given(data=st.data())
@fuzz_settings(ci_examples=200)
def test_fuzz_shipped_manifest(registry_template, data):
    import moa

    real = Path(moa.__file__).parent / "demo_adapters" / "manifest.json"
    doc = json.loads(real.read_text())
    content, field = file_content(data.draw, doc)
    folder = Path(tempfile.mkdtemp(prefix="moa-fuzz-"))
    path = folder / "manifest.json"
    path.write_bytes(content)
    try:
        entries = render_shipped_entries(path)
    except Exception as error:  # noqa: BLE001
        assert isinstance(error, RegistryError), f"{type(error).__name__} leaked for {content[:300]!r}: {error!r}"
        assert "manifest.json" in str(error)
        if field and field in ("files", "base_model", "base_fingerprint", "metrics", "quantization"):
            assert field in str(error), f"field {field!r} not named: {error}"
    else:  # what it renders must be valid registry entries
        schema = json.loads((registry_template / "schema" / "adapter.schema.json").read_text())
        for name, text in entries.items():
            assert validate(tomllib.loads(text), schema) == [], (name, text)
    assert path.read_bytes() == content
    shutil.rmtree(folder)
