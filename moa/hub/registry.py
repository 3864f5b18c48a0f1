"""The curated registry (``registry/``): adapters and plugins as TOML files, checked against schemas.

``load_registry()`` reads and validates every entry; ``resolve(name)`` finds an adapter for
``moa pull NAME``; ``verify_registry()`` checks every adapter pin — against the Hub (or the
HF cache) for a Hub entry, against the files inside the installed moa package for a shipped
entry — and every plugin entry against its package's ``pyproject.toml`` when the package
lives in this repository. ``sync_shipped_entries()`` (re)writes the shipped entries of the
demo adapters from ``moa/demo_adapters/manifest.json``, swapping in the whole ``adapters/``
folder at once.

The registry folder is ``$MOA_REGISTRY`` if set, else ``registry/`` next to the ``moa``
package in a source checkout.

Example::

    from moa.hub.registry import load_registry, resolve
    entry = resolve("sql")                  # AdapterEntry: source (or repo, revision), files...
    entry.is_shipped                        # True: its files are inside the moa package
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

import moa
from moa.errors import HubError, IntegrityError, MoaError, RegistryError, format_choices
from moa.hub.schema_check import validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

logger = logging.getLogger(__name__)

REGISTRY_ENV = "MOA_REGISTRY"
KINDS = ("adapters", "plugins")
_SCHEMAS = {"adapters": "adapter.schema.json", "plugins": "plugin.schema.json"}


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter (see ``registry/schema/adapter.schema.json``).

    A *Hub entry* has ``repo`` and ``revision`` (a pinned commit) and ``source`` ``None``; a
    *shipped entry* has ``source``, a folder inside the moa package relative to the repository
    root (e.g. ``moa/demo_adapters/sql``), and ``repo`` / ``revision`` ``None``. Both pin
    ``files``: every file name -> its sha256.
    """

    name: str
    repo: str | None
    revision: str | None
    adapter_type: str
    base_model: str
    base_fingerprint: str
    files: dict[str, str]
    domains: list[str]
    license: str
    quantization: str | None = None
    description: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    source: str | None = None

    @property
    def is_shipped(self) -> bool:
        """Whether the adapter's files ship inside the moa package (``source``) rather than on the Hub."""
        return self.source is not None

    @property
    def location(self) -> str:
        """Where its files are: ``owner/name@<commit[:12]>``, or ``shipped: moa/demo_adapters/sql``."""
        if self.source is not None:
            return f"shipped: {self.source}"
        return f"{self.repo}@{(self.revision or '')[:12]}"


@dataclass(frozen=True)
class PluginEntry:
    """A registered plugin package (see ``registry/schema/plugin.schema.json``)."""

    name: str
    package: str
    entry_point: str  # "name = module"
    provides: dict[str, list[str]]
    moa_versions: str
    description: str
    license: str
    source: str | None = None
    path: Path | None = None

    def compatible(self, version: str = moa.__version__) -> bool:
        """Whether ``version`` of moa satisfies :attr:`moa_versions`."""
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(self.moa_versions).contains(version, prereleases=True)


@dataclass
class Registry:
    """Every entry, by name; ``root`` is the registry folder."""

    root: Path
    adapters: dict[str, AdapterEntry]
    plugins: dict[str, PluginEntry]


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of checking one entry: ``status`` is ``ok``, ``cached`` (verified from the
    cache, Hub unreachable), ``skipped`` (not checkable here) or ``failed``."""

    kind: str
    name: str
    status: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"


def registry_root(root: str | os.PathLike | None = None) -> Path:
    """The registry folder: ``root``, else ``$MOA_REGISTRY``, else the checkout's ``registry/``."""
    candidate = Path(root or os.environ.get(REGISTRY_ENV) or Path(moa.__file__).resolve().parent.parent / "registry")
    if not (candidate / "schema").is_dir():
        raise RegistryError(
            f"No moa registry at {str(candidate)!r} (it needs schema/, adapters/ and plugins/). Set "
            f"{REGISTRY_ENV}=/path/to/moa/registry (the folder in the moa repository)."
        )
    return candidate


def load_schema(root: Path, kind: str) -> dict[str, Any]:
    """The JSON Schema of one kind of entry."""
    return json.loads((root / "schema" / _SCHEMAS[kind]).read_text())


def load_registry(root: str | os.PathLike | None = None) -> Registry:
    """Read and validate every entry.

    Raises:
        RegistryError: naming each file that is not valid TOML, breaks its schema, or whose
            ``name`` differs from its file name.
    """
    folder = registry_root(root)
    problems: list[str] = []
    found: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        schema = load_schema(folder, kind)
        for path in sorted((folder / kind).glob("*.toml")):
            try:
                data = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
                problems.append(f"{path.relative_to(folder)}: not valid TOML ({error})")
                continue
            errors = validate(data, schema)
            if not errors and data["name"] != path.stem:
                errors = [f"/name: {data['name']!r} must equal the file name {path.stem!r}"]
            if errors:
                problems += [f"{path.relative_to(folder)}{e}" for e in errors]
                continue
            found[kind][data["name"]] = _entry(kind, data, path)
    if problems:
        raise RegistryError(
            f"The registry at {str(folder)!r} has invalid entries:\n  " + "\n  ".join(problems)
            + "\nFix them to match registry/schema/*.schema.json."
        )
    return Registry(folder, found["adapters"], found["plugins"])


def _entry(kind: str, data: dict[str, Any], path: Path) -> AdapterEntry | PluginEntry:
    if kind == "adapters":
        base = data["base"]
        return AdapterEntry(
            name=data["name"], repo=data.get("repo"), revision=data.get("revision"),
            adapter_type=data["adapter_type"], base_model=base["model_id"], base_fingerprint=base["fingerprint"],
            files=dict(data["files"]), domains=list(data["domains"]), license=data["license"],
            quantization=base.get("quantization"), description=data.get("description", ""),
            metrics=dict(data.get("metrics", {})), path=path, source=data.get("source"),
        )
    point = data["entry_point"]
    return PluginEntry(
        name=data["name"], package=data["package"], entry_point=f"{point['name']} = {point['value']}",
        provides={k: list(v) for k, v in data["provides"].items()}, moa_versions=data["moa_versions"],
        description=data["description"], license=data["license"], source=data.get("source"), path=path,
    )


def resolve(name: str, registry: Registry | None = None) -> AdapterEntry:
    """The registered adapter called ``name``.

    Raises:
        RegistryError: listing the registered names.
    """
    registry = registry or load_registry()
    entry = registry.adapters.get(name)
    if entry is None:
        raise RegistryError(
            f"No adapter named {name!r} in the registry. Registered: {format_choices(registry.adapters)}. "
            f"Give a Hub repo id ('owner/name') instead, or run 'moa registry list'."
        )
    return entry


def verify_registry(
    root: str | os.PathLike | None = None,
    *,
    offline_ok: bool = True,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> list[VerifyResult]:
    """Check every entry: adapter pins (sha256 of every file) and plugin sources.

    A Hub entry is fetched at its pinned commit and every file checked against its pin. A
    shipped entry is checked without any network: the files of its ``source`` folder inside
    the installed moa package must be exactly the pinned ones, with the pinned sha256s (a
    missing, extra or changed file fails, named with both hashes).

    Args:
        root: Registry folder (default :func:`registry_root`).
        offline_ok: When the Hub cannot be reached, verify from the HF cache instead, and
            report a Hub adapter that is not cached as ``skipped`` rather than ``failed``.
        cache_dir, token: For the Hub client.

    Returns:
        One :class:`VerifyResult` per entry. Schema problems raise :class:`RegistryError` first.
    """
    from moa.hub.pull import fetch_shipped, fetch_verified, is_offline

    registry = load_registry(root)
    results = []
    for entry in registry.adapters.values():
        if entry.source is not None:
            try:
                shipped = fetch_shipped(entry.source, pinned=entry.files)
                results.append(VerifyResult("adapter", entry.name, "ok",
                                            f"{entry.source} (shipped with moa, {len(shipped.files)} files)"))
            except MoaError as error:
                results.append(VerifyResult("adapter", entry.name, "failed", str(error)))
            continue
        try:
            pulled = fetch_verified(str(entry.repo), kind="adapter", revision=entry.revision, pinned=entry.files,
                                    cache_dir=cache_dir, token=token, cache_fallback=offline_ok)
            status = "cached" if pulled.from_cache else "ok"
            results.append(VerifyResult("adapter", entry.name, status, entry.location))
        except HubError as error:
            skipped = offline_ok and is_offline()
            results.append(VerifyResult("adapter", entry.name, "skipped" if skipped else "failed", str(error)))
        except (IntegrityError, MoaError) as error:
            results.append(VerifyResult("adapter", entry.name, "failed", str(error)))
    results += [_verify_plugin(registry.root.parent, entry) for entry in registry.plugins.values()]
    return results


def _verify_plugin(repo_root: Path, entry: PluginEntry) -> VerifyResult:
    if not entry.compatible():
        return VerifyResult("plugin", entry.name, "failed",
                            f"moa {moa.__version__} is outside its moa_versions {entry.moa_versions!r}")
    if entry.source is None:
        return VerifyResult("plugin", entry.name, "skipped", "not in this repository")
    pyproject = repo_root / entry.source / "pyproject.toml"
    if not pyproject.is_file():
        return VerifyResult("plugin", entry.name, "failed", f"{entry.source}/pyproject.toml does not exist")
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    points = project.get("entry-points", {}).get("moa", {})
    problems = []
    if project.get("name") != entry.package:
        problems.append(f"package is {project.get('name')!r} in pyproject.toml, {entry.package!r} in the registry")
    name, _, value = entry.entry_point.partition(" = ")
    if points.get(name) != value:
        problems.append(f"entry point {entry.entry_point!r} not in its [project.entry-points.moa] ({points})")
    if problems:
        return VerifyResult("plugin", entry.name, "failed", "; ".join(problems))
    return VerifyResult("plugin", entry.name, "ok", f"{entry.source} matches")


# --- shipped entries of the demo adapters, generated from their manifest ------------------

#: The demo adapters' manifest inside the moa package, and the ``source`` prefix of their entries.
SHIPPED_MANIFEST = Path("demo_adapters") / "manifest.json"
SHIPPED_PREFIX = "moa/demo_adapters/"
_SHIPPED_FILE = re.compile(r"[a-z0-9_\-]+/[A-Za-z0-9_.\-]+")
_SHIPPED_HEADER = (
    "# moa registry: adapter entry (schema: registry/schema/adapter.schema.json)\n"
    "# Generated from moa/demo_adapters/manifest.json by 'moa registry sync-shipped'; do not edit.\n"
)
_SHIPPED_DESCRIPTIONS = {
    "sql": "Demo text-to-SQL LoRA: a question about the Chinook database -> one SQLite query.",
    "arithmetic": "Demo arithmetic LoRA: 2-3 small integer terms with + and - (sometimes a product) -> the number.",
    "icd": "Demo medical-coding LoRA: an ICD-10-CM diagnosis description -> its chapter title.",
    "french": "Demo French LoRA: numbers in words, dates and country names -> French text.",
    "code": "Demo Python LoRA: a described operation over filtered numbers -> solve(nums).",
}


def render_shipped_entries(manifest: str | os.PathLike | None = None) -> dict[str, str]:
    """The TOML text (written with ``tomli-w``) of the registry entry of every demo adapter, by name.

    Each adapter folder of the manifest (one holding ``adapter_config.json``) becomes a
    shipped entry: ``source = "moa/demo_adapters/<name>"``, the base model, fingerprint and
    quantization of the manifest, the sha256 of every file of that folder, and its
    ``dev_accuracy``.

    Args:
        manifest: ``manifest.json`` to read (default: the one inside the installed moa package).

    Raises:
        RegistryError: the manifest is unreadable or lacks ``files``, ``base_model`` or
            ``base_fingerprint``.
    """
    path = Path(manifest) if manifest else Path(moa.__file__).resolve().parent / SHIPPED_MANIFEST
    data = _read_shipped_manifest(path)
    files: dict[str, str] = data["files"]
    base = (data["base_model"], data["base_fingerprint"], data.get("quantization") or "none")
    by_folder: dict[str, dict[str, str]] = {}
    for key, digest in files.items():
        folder, _, name = key.partition("/")
        by_folder.setdefault(folder, {})[name] = digest
    entries = {}
    for name, pins in sorted(by_folder.items()):
        if "adapter_config.json" not in pins:  # e.g. router/
            continue
        metrics = data.get("metrics", {}).get(name, {})
        accuracy = metrics.get("dev_accuracy") if isinstance(metrics, dict) else None
        entry: dict[str, Any] = {
            "name": name,
            "source": SHIPPED_PREFIX + name,
            "adapter_type": "lora",
            "description": _SHIPPED_DESCRIPTIONS.get(name, f"Demo LoRA for the {name} domain."),
            "domains": [name],
            "license": "apache-2.0",
            "base": {"model_id": base[0], "fingerprint": base[1], "quantization": base[2]},
            "files": dict(sorted(pins.items())),
        }
        if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and math.isfinite(accuracy):
            entry["metrics"] = {"dev_accuracy": float(accuracy)}
        _check_shipped_entry(entry, path)
        entries[name] = _SHIPPED_HEADER + tomli_w.dumps(entry)
    return entries


def _shipped_problem(what: str, value: Any, expected: str) -> str:
    return f"field {what} = {str(value)[:60]!r}; expected {expected}"


def _read_shipped_manifest(path: Path) -> dict[str, Any]:
    """The demo adapters' manifest, its fields checked (RegistryError naming the file and field)."""
    problem = None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        data, problem = None, f"{type(error).__name__}: {error}"
    if problem is None and not isinstance(data, dict):
        problem = f"it holds a JSON {type(data).__name__}, not an object"
    elif problem is None:
        files, metrics = data.get("files"), data.get("metrics", {})
        if not isinstance(files, dict) or not files:
            problem = _shipped_problem("files", files, "a non-empty object {'<adapter>/<file>': sha256}")
        elif bad := [k for k, v in files.items() if not isinstance(v, str) or not _SHIPPED_FILE.fullmatch(k)]:
            problem = _shipped_problem(f"files[{bad[0]!r}]", files[bad[0]],
                                       "a key '<adapter folder>/<file name>' and a sha256 string")
        for key in ("base_model", "base_fingerprint"):
            if problem is None and (not isinstance(data.get(key), str) or not data[key]):
                problem = _shipped_problem(key, data.get(key), "a non-empty string")
        if problem is None and not isinstance(data.get("quantization") or "none", str):
            problem = _shipped_problem("quantization", data.get("quantization"), "a string or null")
        if problem is None and not isinstance(metrics, dict):
            problem = _shipped_problem("metrics", metrics, "an object {adapter: {dev_accuracy: number}}")
    if problem:
        raise RegistryError(
            f"Cannot read the demo adapters' manifest {str(path)!r}: {problem}. It needs 'files', 'base_model' and "
            f"'base_fingerprint'. Regenerate it by retraining (moa demo) or restore it."
        )
    return data


def _check_shipped_entry(entry: dict[str, Any], manifest: Path) -> None:
    """Raise RegistryError if the entry rendered from ``manifest`` breaks the adapter schema."""
    try:
        schema = load_schema(registry_root(), "adapters")
    except RegistryError:  # an installed moa without its registry folder: nothing to check against
        return
    errors = validate(entry, schema)
    if errors:
        raise RegistryError(
            f"The demo adapters' manifest {str(manifest)!r} gives adapter {entry['name']!r} an invalid registry "
            f"entry: {'; '.join(errors)}. Fix that field of the manifest (or regenerate it by retraining)."
        )


def sync_shipped_entries(
    root: str | os.PathLike | None = None, *, write: bool = True, manifest: str | os.PathLike | None = None
) -> list[str]:
    """Make the shipped entries of ``adapters/`` match :func:`render_shipped_entries`, atomically for the set.

    Writes missing or stale entries and removes entries whose ``source`` is under
    ``moa/demo_adapters/`` but which the manifest no longer lists. Run it (``moa registry
    sync-shipped``) after retraining the demo adapters, then ``moa registry render --write``.

    The whole ``adapters/`` folder is replaced in one step (:func:`moa.atomic.atomic_directory`),
    so a reader sees all the old entries or all the new ones, never a mix. Shipped and
    non-shipped entries share that folder (plugins live apart, in ``plugins/``, untouched): the
    new folder, a hidden sibling ``.adapters.tmp-<pid>-<random>``, first gets a copy of every
    file of ``adapters/`` that the sync does not change (Hub entries, ``README.md``, anything
    else: same bytes, mode and times; unchanged shipped entries too), then the missing and stale
    entries, each flushed to disk; it is then swapped with ``adapters/`` (one
    ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, repaired by the next sync).

    An exception (disk full, no permission) removes the new folder and leaves ``adapters/`` as it
    was. A SIGKILL may leave the hidden sibling in the registry folder: readers ignore it (they
    read only ``adapters/`` and ``plugins/``) and the next writing sync removes it before reading
    (and first puts ``adapters/`` back if a kill between two renames left it moved aside). Edits
    made to ``adapters/`` by another process while a sync runs are lost: the sync copies the
    folder as it found it.

    Args:
        root: Registry folder (default :func:`registry_root`).
        write: ``False`` changes nothing and only reports (what ``--check`` and the tests use).
        manifest: ``manifest.json`` to read (default: the installed package's).

    Returns:
        What differs (or was changed), e.g. ``["adapters/sql.toml: stale"]``; empty when up to date.

    Raises:
        WriteError: the disk is full or the folder is not writable (``adapters/`` untouched).
    """
    from moa.atomic import atomic_directory, clean_stale

    folder = registry_root(root) / "adapters"
    if folder.is_symlink():  # swap the folder it points to, not the link
        folder = folder.resolve()
    if write:
        clean_stale(folder)  # what a killed sync left: put back a moved-aside folder, remove temp copies
    wanted = render_shipped_entries(manifest)
    changes, replaced = _shipped_changes(folder, wanted)
    if write and changes:
        with atomic_directory(folder) as new:
            logger.debug("Building the new shipped registry entries in %s", new)
            if folder.is_dir():
                shutil.copymode(folder, new)
                for path in sorted(folder.iterdir()):
                    if path.name not in replaced:
                        _copy_unchanged(path, new / path.name)
            for name, text in wanted.items():
                if f"{name}.toml" in replaced:
                    _write_entry(new / f"{name}.toml", text.encode(), folder / f"{name}.toml")
    if changes:
        logger.info("Shipped registry entries %s: %s", "synced" if write else "out of date", "; ".join(changes))
    return changes


def _shipped_changes(folder: Path, wanted: dict[str, str]) -> tuple[list[str], set[str]]:
    """What a sync changes in ``folder``: the report lines, and the file names it writes or removes."""
    changes: list[str] = []
    replaced: set[str] = set()
    for name, text in wanted.items():
        path = folder / f"{name}.toml"
        if not path.is_file() or path.read_text() != text:
            changes.append(f"adapters/{path.name}: {'stale' if path.is_file() else 'missing'}")
            replaced.add(path.name)
    for path in sorted(folder.glob("*.toml")):
        try:
            source = tomllib.loads(path.read_text()).get("source", "")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        if path.stem not in wanted and isinstance(source, str) and source.startswith(SHIPPED_PREFIX):
            changes.append(f"adapters/{path.name}: not in the manifest")
            replaced.add(path.name)
    return changes, replaced


def _copy_unchanged(source: Path, destination: Path) -> None:
    """Copy one entry of the old ``adapters/`` into the new one as it is (a link as a link)."""
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, destination, symlinks=True)
    else:
        shutil.copy2(source, destination, follow_symlinks=False)


def _write_entry(path: Path, data: bytes, target: Path) -> None:
    """Write one entry into the new folder and flush it; an error names ``target``, where it was going.

    Raises:
        WriteError: the disk is full or the folder is not writable.
    """
    from moa.atomic import write_error

    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise write_error(error, target, "write") from error


__all__ = [
    "AdapterEntry",
    "PluginEntry",
    "Registry",
    "VerifyResult",
    "load_registry",
    "registry_root",
    "render_shipped_entries",
    "resolve",
    "sync_shipped_entries",
    "verify_registry",
]
