"""Mixture manifests (``moa_mixture.json``): a base, pinned adapters and a router, on the Hub.

A manifest names the base (Hub id, fingerprint, quantization), pins every adapter to a
repo, a commit id and the sha256 of each of its files, and pins the router the same way.
:func:`push_mixture` publishes the adapters (a no-op for unchanged ones), then the
manifest; :func:`pull_mixture` verifies every pin and the base fingerprint and only then
loads the adapters into a model, all or nothing.

Example (``moa_mixture.json``)::

    {"format": "moa-mixture", "format_version": 1, "moa_version": "0.1.0",
     "base": {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "fingerprint": "3f2a...", "quantization": "nf4"},
     "adapters": [{"name": "sql", "repo": "alice/sql-lora", "revision": "<40 hex>", "adapter_type": "lora",
                   "files": {"adapter_config.json": "<sha256>", "adapter_model.safetensors": "<sha256>"}}],
     "router": null}
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import moa
from moa.adapters.file_checks import refuse_remote_code
from moa.errors import AdapterExistsError, BaseModelMismatchError, ManifestError, MoaError, format_choices
from moa.hub.model_card import render_mixture_card
from moa.hub.pull import (
    CARD_NAME,
    MANIFEST_NAME,
    PulledRepo,
    check_repo_id,
    fetch_verified,
    load_router_folder,
    router_type_of,
)
from moa.hub.push import PushResult, push_adapter, push_files, push_router
from moa.hub.verify import Limits, check_file_name, check_not_pickle, check_sha256_hex

if TYPE_CHECKING:
    from moa.model.mixture_model import MixtureModel

logger = logging.getLogger(__name__)

FORMAT = "moa-mixture"
FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
#: ASCII only, no trailing newline (pull.check_repo_id's pattern also takes Unicode letters and a final "\n").
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class BaseSpec:
    """The base model a mixture was made on."""

    model_id: str | None
    fingerprint: str
    quantization: str | None = None


@dataclass(frozen=True)
class AdapterPin:
    """One adapter of a mixture, pinned to a commit and the sha256 of each of its files."""

    name: str
    repo: str
    revision: str
    files: dict[str, str]
    adapter_type: str = "lora"


@dataclass(frozen=True)
class RouterPin:
    """The router of a mixture, pinned like an adapter."""

    repo: str
    revision: str
    files: dict[str, str]
    router_type: str | None = None


@dataclass
class MixtureManifest:
    """A parsed ``moa_mixture.json``; after :func:`pull_mixture`, also where things landed.

    Attributes:
        base: The base model it was made on.
        adapters: Pinned adapters, in load order.
        router: The pinned router, or ``None``.
        moa_version: moa version that wrote it.
        repo_id, commit: The mixture repo and commit it was pulled from (``None`` if not pulled).
        adapter_paths: Adapter name -> verified local folder (after a pull).
        router_path: Verified local router folder (after a pull), or ``None``.
        router_instance: The router object set on the model, when one could be built.
    """

    base: BaseSpec
    adapters: list[AdapterPin]
    router: RouterPin | None = None
    moa_version: str = moa.__version__
    repo_id: str | None = None
    commit: str | None = None
    adapter_paths: dict[str, Path] = field(default_factory=dict)
    router_path: Path | None = None
    router_instance: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (only the published fields)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "moa_version": self.moa_version,
            "base": {"model_id": self.base.model_id, "fingerprint": self.base.fingerprint,
                     "quantization": self.base.quantization},
            "adapters": [{"name": a.name, "repo": a.repo, "revision": a.revision, "adapter_type": a.adapter_type,
                          "files": dict(sorted(a.files.items()))} for a in self.adapters],
            "router": None if self.router is None else {
                "repo": self.router.repo, "revision": self.router.revision, "router_type": self.router.router_type,
                "files": dict(sorted(self.router.files.items()))},
        }

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys), so an unchanged mixture pushes as a no-op."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> MixtureManifest:
        """Parse and validate a manifest; raise :class:`ManifestError` naming the bad field."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as error:
            raise ManifestError(f"{source} is not valid JSON: {error}. Push the mixture again.") from error
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_NAME) -> MixtureManifest:
        """Validate a manifest document (see the module docstring for its shape)."""
        try:
            _check(isinstance(data, dict), "the document", data, "a JSON object")
            _check(data.get("format") == FORMAT, "format", data.get("format"), repr(FORMAT))
            _check(data.get("format_version") == FORMAT_VERSION, "format_version", data.get("format_version"),
                   f"{FORMAT_VERSION} (upgrade moa if it is newer)")
            base = data.get("base")
            _check(isinstance(base, dict) and isinstance(base.get("fingerprint"), str) and base["fingerprint"],
                   "base.fingerprint", base, "a non-empty string")
            for key in ("model_id", "quantization"):
                _check(isinstance(base.get(key), (str, type(None))), f"base.{key}", base.get(key), "a string or null")
            refuse_remote_code(data, source)
            adapters = [_adapter_pin(item, i) for i, item in enumerate(_list(data.get("adapters"), "adapters"))]
            names = [a.name for a in adapters]
            _check(len(set(names)) == len(names), "adapters[].name", names, "unique names")
            router = None if data.get("router") is None else _router_pin(data["router"])
            return cls(
                base=BaseSpec(base.get("model_id"), base["fingerprint"], base.get("quantization")),
                adapters=adapters, router=router, moa_version=str(data.get("moa_version", "?")),
            )
        except ManifestError as error:
            raise ManifestError(f"{source}: {error}") from None
        except MoaError as error:  # a bad sha256 or file name inside a pin
            raise ManifestError(f"{source}: {error}") from error


def _check(ok: bool, what: str, value: Any, expected: str) -> None:
    if not ok:
        raise ManifestError(f"field {what} is {value!r}; expected {expected}. Push the mixture again with moa.")


def _list(value: Any, what: str) -> list[Any]:
    _check(isinstance(value, list), what, value, "a list")
    return value


def _files(value: Any, what: str) -> dict[str, str]:
    _check(isinstance(value, dict) and len(value) > 0, what, value, "a non-empty {file: sha256} object")
    for name, digest in value.items():
        check_file_name(name, what)
        check_not_pickle(name, what)
        check_sha256_hex(digest, f"{what}[{name!r}]")
    return dict(value)


def _adapter_pin(item: Any, index: int) -> AdapterPin:
    where = f"adapters[{index}]"
    _check(isinstance(item, dict), where, item, "an object")
    _check(isinstance(item.get("name"), str) and bool(_NAME.fullmatch(item["name"])), f"{where}.name",
           item.get("name"), "letters, digits, '_' and '-'")
    _check(isinstance(item.get("repo"), str) and bool(_REPO.fullmatch(item["repo"])), f"{where}.repo",
           item.get("repo"), "'owner/name' (ASCII letters, digits, '-', '_', '.')")
    check_repo_id(item["repo"])
    _check(isinstance(item.get("revision"), str) and bool(_HEX40.fullmatch(item["revision"])), f"{where}.revision",
           item.get("revision"), "a 40-hex commit id (pins never name a branch)")
    _check(isinstance(item.get("adapter_type", "lora"), str), f"{where}.adapter_type", item.get("adapter_type"),
           "an adapter type name such as 'lora'")
    return AdapterPin(item["name"], item["repo"], item["revision"], _files(item.get("files"), f"{where}.files"),
                      item.get("adapter_type") or "lora")


def _router_pin(item: Any) -> RouterPin:
    _check(isinstance(item, dict) and isinstance(item.get("repo"), str), "router", item, "an object with 'repo'")
    _check(bool(_REPO.fullmatch(item["repo"])), "router.repo", item["repo"], "'owner/name' (ASCII)")
    check_repo_id(item["repo"])
    _check(isinstance(item.get("revision"), str) and bool(_HEX40.fullmatch(item["revision"])), "router.revision",
           item.get("revision"), "a 40-hex commit id")
    _check(isinstance(item.get("router_type"), (str, type(None))), "router.router_type", item.get("router_type"),
           "a router type name or null")
    return RouterPin(item["repo"], item["revision"], _files(item.get("files"), "router.files"),
                     item.get("router_type"))


# --- push -------------------------------------------------------------------------------


def push_mixture(
    model: MixtureModel,
    repo_id: str,
    adapters: Mapping[str, str] | None = None,
    router_repo: str | None = None,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's name
) -> PushResult:
    """Publish every adapter (and the router), then a manifest pinning them, to ``repo_id``.

    Args:
        model: The model holding the adapters (and, optionally, a router with ``save``).
        repo_id: The mixture repo (``owner/name``).
        adapters: Adapter name -> its repo id. Default: every loaded adapter, to
            ``<repo_id>-<name>``. Each is pushed first (a no-op when unchanged) and pinned to
            the resulting commit and file sha256s.
        router_repo: Where the router lives: ``model.router`` is pushed there if it can
            ``save``; otherwise the repo's current ``main`` is pinned as it is.
        revision: Branch of the mixture repo (default ``main``).
        private: As for :func:`moa.hub.push_adapter`.
        commit_message: As for :func:`moa.hub.push_adapter`.
        token: As for :func:`moa.hub.push_adapter`.
        license: As for :func:`moa.hub.push_adapter`.

    Returns:
        The commit of the manifest (``files`` holds the manifest's sha256).
    """
    from moa.model.base_loading import describe_base

    check_repo_id(repo_id)
    targets = dict(adapters) if adapters is not None else {n: f"{repo_id}-{n}" for n in model.adapter_names}
    unknown = [n for n in targets if n not in model.adapter_names]
    if unknown or not targets:
        raise ManifestError(
            f"push_mixture: adapter(s) {unknown or '(none)'} not loaded in the model. Loaded: "
            f"{format_choices(model.adapter_names)}. Pass adapters={{name: repo_id}} for loaded adapters."
        )
    pins = []
    for name, adapter_repo in targets.items():
        pushed = push_adapter(model, name, adapter_repo, private=private, token=token, license=license)
        pins.append(AdapterPin(name, adapter_repo, pushed.oid, pushed.files, model.peft_config[name].adapter_type))
    router_pin = _publish_router(model, router_repo, private, token) if router_repo else None
    base = describe_base(model.base_model)
    manifest = MixtureManifest(BaseSpec(base.get("model_id") or None, model.base_fingerprint, base.get("quantization")),
                               pins, router_pin)
    files: dict[str, Path | bytes] = {
        MANIFEST_NAME: manifest.to_json().encode(),
        CARD_NAME: render_mixture_card(manifest, repo_id=repo_id, license=license).encode(),
    }
    return push_files(repo_id, files, revision=revision, private=private, token=token,
                      commit_message=commit_message or f"Mixture of {', '.join(targets)} (moa)")


def _publish_router(model: MixtureModel, router_repo: str, private: bool, token: str | None) -> RouterPin:
    router = model.router
    if router is not None and callable(getattr(router, "save", None)):
        pushed = push_router(router, router_repo, private=private, token=token)
        return RouterPin(router_repo, pushed.oid, pushed.files, getattr(router, "name", None) or None)
    pulled = fetch_verified(router_repo, kind="router", token=token)
    return RouterPin(router_repo, pulled.commit, pulled.files, _router_type(pulled.path))


def _router_type(folder: Path) -> str | None:
    try:
        return router_type_of(json.loads((folder / "router_config.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return None


# --- pull -------------------------------------------------------------------------------


def pull_mixture(
    repo_id: str,
    revision: str | None = None,
    model: MixtureModel | None = None,
    *,
    cache_dir: str | None = None,
    token: str | None = None,
    set_router: bool = True,
) -> MixtureManifest:
    """Pull a mixture: verify every pin, then (with ``model``) load every adapter, all or nothing.

    Order: the manifest is fetched and validated; with a model, its base fingerprint and
    free adapter names are checked; every adapter (and the router) is fetched at its pinned
    commit and each file checked against its pinned sha256; every adapter is then fully
    built against the model (shapes, targets, ranks). Only then are they loaded; a failure
    while loading removes those already loaded.

    Args:
        repo_id: The mixture repo.
        revision: Branch, tag or commit of the mixture repo.
        model: Load the adapters into it (and set the router if it can be built).
        cache_dir: As for :func:`moa.hub.pull_adapter`.
        token: As for :func:`moa.hub.pull_adapter`.
        set_router: With a model, set the pinned router on it when it can be instantiated.

    Returns:
        The manifest, with ``adapter_paths`` / ``router_path`` of the verified local folders.

    Raises:
        ManifestError: The manifest is invalid.
        BaseModelMismatchError: The manifest's base fingerprint is not the model's.
        AdapterExistsError: An adapter name is already loaded.
        IntegrityError: A file does not match its pinned sha256.
        UnsafeFileError: An unsafe file name, or weights only as a pickle.
        HubError: The repo, the revision or the network failed.
        MoaError: Any adapter loading error; nothing stays loaded.
    """
    pulled = fetch_verified(repo_id, kind="mixture", revision=revision, cache_dir=cache_dir, token=token)
    manifest = MixtureManifest.from_json((pulled.path / MANIFEST_NAME).read_text(), f"{repo_id}/{MANIFEST_NAME}")
    manifest.repo_id, manifest.commit = repo_id, pulled.commit
    if model is not None:
        _check_model(manifest, model)
    limits = Limits.from_env(model.max_rank if model is not None else None)
    from huggingface_hub.utils import tqdm

    verified: dict[str, PulledRepo] = {}
    for pin in tqdm(manifest.adapters, desc=f"Verifying {len(manifest.adapters)} adapters", unit="adapter"):
        verified[pin.name] = fetch_verified(pin.repo, kind="adapter", revision=pin.revision, pinned=pin.files,
                                            cache_dir=cache_dir, token=token, limits=limits)
    manifest.adapter_paths = {name: p.path for name, p in verified.items()}
    if manifest.router is not None:
        manifest.router_path = fetch_verified(manifest.router.repo, kind="router", revision=manifest.router.revision,
                                              pinned=manifest.router.files, cache_dir=cache_dir, token=token).path
    if model is not None:
        if set_router and manifest.router_path is not None:  # built before any adapter is loaded
            manifest.router_instance = load_router_folder(manifest.router_path)
        _load_all(model, manifest)
    return manifest


def _check_model(manifest: MixtureManifest, model: MixtureModel) -> None:
    if manifest.base.fingerprint != model.base_fingerprint:
        raise BaseModelMismatchError(
            f"Mixture {manifest.repo_id!r} was made for base {manifest.base.model_id!r} (fingerprint "
            f"{manifest.base.fingerprint}), but this model's base has fingerprint {model.base_fingerprint}. "
            f"Nothing was loaded. Load the mixture on MixtureModel.from_pretrained({manifest.base.model_id!r})."
        )
    taken = [a.name for a in manifest.adapters if a.name in model.peft_config]
    if taken:
        raise AdapterExistsError(
            f"Mixture {manifest.repo_id!r} brings adapter(s) {', '.join(taken)}, already loaded in this model "
            f"(loaded: {format_choices(model.adapter_names)}). Nothing was loaded. Delete them first "
            f"(model.delete_adapter(name)) or use a fresh model."
        )


def _load_all(model: MixtureModel, manifest: MixtureManifest) -> None:
    from moa.model import adapter_io

    for pin in manifest.adapters:  # build everything first: shapes, targets, fingerprints
        adapter_io.read_adapter(model, manifest.adapter_paths[pin.name])
    loaded: list[str] = []
    previous_router = model.router
    try:
        for pin in manifest.adapters:
            model.load_adapter(manifest.adapter_paths[pin.name], adapter_name=pin.name)
            loaded.append(pin.name)
        if manifest.router_instance is not None:
            model.set_router(manifest.router_instance)
    except BaseException:
        model.set_router(previous_router)
        for name in reversed(loaded):
            model.delete_adapter(name)
        raise
    logger.info("Loaded mixture %s: %s.", manifest.repo_id, ", ".join(loaded))


__all__ = ["AdapterPin", "BaseSpec", "MixtureManifest", "RouterPin", "pull_mixture", "push_mixture"]
