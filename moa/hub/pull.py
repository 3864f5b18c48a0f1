"""Verified pulls of adapter and router repos from the Hugging Face Hub (or its local cache).

A pull resolves the revision to one commit, checks the Hub's file listing at that commit
(safe names, no pickles among the files it fetches, sizes under the caps), downloads only
the files moa needs with ``hf_hub_download`` at that exact commit, then checks every file
against the hash the Hub listed (sha256 for LFS files, the git blob id otherwise) and,
when given, against pinned sha256s. A file that fails is removed from the cache and
nothing is returned. Transient Hub failures (5xx, resets, timeouts) are retried, and a file
cached under another hash than the listed one is refused (:mod:`moa.hub.download`). With ``HF_HUB_OFFLINE=1`` the files come from the HF cache, checked
against the content-addressed blob names the cache keeps.

Registry entries pull by name (:func:`pull_registered`): a Hub entry at its pinned commit and
sha256s, a *shipped* entry (an adapter inside the moa package, e.g. ``moa/demo_adapters/sql``)
without any network, its files checked against the registry's sha256s
(:func:`fetch_shipped`).

Example::

    from moa.hub import pull_adapter
    folder = pull_adapter("alice/sql-lora", revision="v1")   # local, verified PEFT folder
    model.load_adapter(folder, adapter_name="sql")
    folder = pull_registered("sql")                           # registry name, verified against its pins
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import moa
from moa.adapters.peft_format import CONFIG_NAME, MOA_METADATA_NAME, WEIGHTS_NAME
from moa.errors import AdapterFormatError, HubError, IntegrityError, MoaError, RegistryError
from moa.hub.download import (
    cached_expectation,
    check_cache_name,
    download_files,
    evict,
    is_transient,
    retry_attempts,
    retrying,
)
from moa.hub.verify import (
    Limits,
    RemoteFile,
    check_adapter_config_ranks,
    check_against_listing,
    check_file_name,
    check_listing,
    check_not_pickle,
    check_safetensors_header,
    is_pickle_name,
    sha256_file,
    verify_digests,
    verify_folder_exact,
)

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
ROUTER_CONFIG_NAME = "router_config.json"
ROUTER_WEIGHTS_NAME = "router.safetensors"
MANIFEST_NAME = "moa_mixture.json"
#: Index of a multi-adapter (``save_pretrained``) folder or repo; see :mod:`moa.hub.pretrained`.
PRETRAINED_INDEX_NAME = "moa_adapters.json"
#: The files a pull fetches for each kind of repo (others in the repo are never downloaded).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, MOA_METADATA_NAME, CARD_NAME)
ROUTER_FILES = (ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME, CARD_NAME)
MIXTURE_FILES = (MANIFEST_NAME, CARD_NAME)
#: A multi-adapter repo is fetched in two steps: its index first, then the files the index pins.
PRETRAINED_FILES = (PRETRAINED_INDEX_NAME, CARD_NAME)
_REQUIRED = {
    "adapter": (CONFIG_NAME, WEIGHTS_NAME),
    "router": (ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME),
    "mixture": (MANIFEST_NAME,),
    "pretrained": (PRETRAINED_INDEX_NAME,),
}
_WANTED = {"adapter": ADAPTER_FILES, "router": ROUTER_FILES, "mixture": MIXTURE_FILES,
           "pretrained": PRETRAINED_FILES}
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+")  # ASCII only, whole string (fullmatch)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
#: What a failed push leaves behind, and the next step (a push is one commit).
PUSH_NEXT_STEP = ("A push is one commit: the branch is still at its previous commit, or (if the Hub applied the "
                  "commit before the connection broke) at the complete new one; pushing again is safe, as "
                  "identical files make no new commit. ")


@dataclass(frozen=True)
class PulledRepo:
    """A verified local copy of some files of a Hub repo at one commit.

    Attributes:
        repo_id: ``owner/name``.
        revision: The revision asked for (branch, tag, commit) or ``None`` (= ``main``).
        commit: The 40-hex commit it resolved to.
        path: Local folder holding the files (a snapshot in the HF cache).
        files: File name -> sha256 of every fetched file.
        from_cache: Whether it came from the local HF cache without asking the Hub.
    """

    repo_id: str
    revision: str | None
    commit: str
    path: Path
    files: dict[str, str] = field(default_factory=dict)
    from_cache: bool = False


def is_offline() -> bool:
    """Whether Hub access is off (``HF_HUB_OFFLINE=1`` now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(constants.is_offline_mode())


def check_repo_id(repo_id: object) -> str:
    """Return ``repo_id`` if it looks like ``owner/name``, else raise :class:`HubError`."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(
            f"{repo_id!r} is not a Hub repo id. Use 'owner/name' (letters, digits, '-', '_', '.'), "
            f"e.g. 'alice/sql-lora'."
        )
    return repo_id


def endpoint() -> str:
    """The Hub endpoint huggingface_hub talks to (``HF_ENDPOINT``, read at its import)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, action: str) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into :class:`HubError` with a next step."""
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id!r} (revision {revision or 'main'})"
    try:
        yield
    except MoaError:
        raise
    except hf_errors.RevisionNotFoundError as error:
        raise _answered(HubError(
            f"Could not {action} {where}: the revision does not exist. Give a branch, tag or full "
            f"40-character commit id (list them with HfApi().list_repo_refs({repo_id!r}))."
        )) from error
    except hf_errors.RepositoryNotFoundError as error:
        raise _answered(HubError(
            f"Could not {action} {where}: no such repo on {endpoint()}, or it is private and no valid "
            f"token was given. Check the repo id, HF_ENDPOINT and HF_TOKEN (or pass token=...)."
        )) from error
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as error:
        raise HubError(
            f"Could not {action} {where}: it is not in the local Hugging Face cache and the Hub cannot "
            f"be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}). Pull it once while "
            f"online, or unset HF_HUB_OFFLINE. ({type(error).__name__}: {error})"
        ) from error
    except Exception as error:  # noqa: BLE001 - the client raises many types; all mean "Hub failed"
        tried = f" (tried {retry_attempts()} times)" if is_transient(error) else ""
        after = PUSH_NEXT_STEP if action == "push to" else "Nothing was cached. "
        raise HubError(
            f"Could not {action} {where} on {endpoint()}{tried}: {type(error).__name__}: {error}. {after}Check "
            f"HF_ENDPOINT, your network and token, then retry."
        ) from error


def _answered(error: HubError) -> HubError:
    """Mark an error as a definite answer from the Hub (not a network failure)."""
    error.hub_answered = True  # type: ignore[attr-defined]
    return error


def _listing(repo_id: str, revision: str | None, token: str | None) -> tuple[str, list[RemoteFile]]:
    """The commit a revision resolves to, and every file the Hub lists there.

    One ``model_info`` call (huggingface_hub sends it once, without retries of its own), retried by
    :func:`~moa.hub.download.retrying`: a Hub failing every time is given up on within
    :func:`~moa.hub.download.give_up_bound_s` (``HF_HUB_DOWNLOAD_TIMEOUT`` per request).

    Raises:
        HubError: the repo or revision does not exist, or every attempt failed (what failed, attempts, time).
    """
    from huggingface_hub import HfApi, constants

    api = HfApi(token=token)
    with hub_errors(repo_id, revision, "list"):
        info = retrying(lambda: api.model_info(repo_id, revision=revision, files_metadata=True,
                                               timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT),
                        f"list the files of {repo_id!r} at revision {revision or 'main'}")
    commit = str(info.sha or "")
    if not _HEX40.match(commit):
        raise HubError(f"The Hub answered commit id {commit!r} for {repo_id!r}; expected 40 hex digits.")
    files = [
        RemoteFile(
            path=s.rfilename, size=s.size, blob_id=s.blob_id, lfs_sha256=s.lfs.sha256 if s.lfs else None
        )
        for s in info.siblings or []
    ]
    return commit, files


def _remember_ref(snapshot: Path, revision: str, commit: str) -> None:
    """Record ``revision -> commit`` in the HF cache (``refs/<revision>``) for later offline pulls.

    Files are downloaded at the resolved commit (so a moving branch cannot mix two commits),
    which leaves the cache without the branch or tag name; this writes it, as
    ``hf_hub_download`` does for a named revision.
    """
    from moa.atomic import atomic_write_bytes

    storage = snapshot.parent.parent
    if snapshot.parent.name != "snapshots" or not storage.name.startswith("models--"):
        return
    with contextlib.suppress(OSError):
        atomic_write_bytes(storage / "refs" / check_file_name(revision), commit.encode())


def fetch_verified(
    repo_id: str,
    *,
    kind: str,
    revision: str | None = None,
    pinned: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    limits: Limits | None = None,
    cache_fallback: bool = False,
) -> PulledRepo:
    """Fetch the files of one repo at one commit and verify each; the core of every pull.

    Args:
        repo_id: ``owner/name``.
        kind: ``"adapter"``, ``"router"``, ``"mixture"`` or ``"pretrained"`` (a multi-adapter
            index): which files to fetch and require.
        revision: Branch, tag or commit (default ``main``).
        pinned: File name -> sha256 that must match exactly (then exactly these files are fetched).
        cache_dir: HF cache folder (default: huggingface_hub's).
        token: Hub token (default: the logged-in one, if any).
        limits: Size and rank caps (default :meth:`Limits.from_env`).
        cache_fallback: When the Hub cannot be reached, use the HF cache as if offline.

    Raises:
        HubError: repo or revision not found, Hub unreachable and not cached (given up on within
            :func:`moa.hub.download.give_up_bound_s` when it fails every time).
        UnsafeFileError: an unsafe name in the listing, a pickle where weights should be, a file too big.
        IntegrityError: a file whose hash differs from the listing or the pin.
        AdapterFormatError: a required file is missing.
    """
    check_repo_id(repo_id)
    limits = limits or Limits.from_env()
    source = f"Hub repo {repo_id!r}" + (f" at {revision!r}" if revision else "")
    wanted = tuple(pinned) if pinned is not None else _WANTED[kind]
    for name in wanted:
        check_file_name(name, source)
        check_not_pickle(name, source)
    offline = is_offline()
    listed: dict[str, RemoteFile] = {}
    commit = None
    if not offline:
        try:
            commit, files = _listing(repo_id, revision, token)
        except HubError as error:
            if not cache_fallback or getattr(error, "hub_answered", False):
                raise
            logger.warning("%s: the Hub is unreachable (%s); verifying from the local cache.", source, error)
            offline = True
    if not offline:
        listed = {f.path: f for f in check_listing(files, limits, source)}
        _check_required(kind, wanted, listed, source, pinned is not None)
        wanted = tuple(name for name in wanted if name in listed)
    with hub_errors(repo_id, commit or revision, "download"):
        local = download_files(repo_id, commit or revision, wanted, cache_dir, token, offline, source)
    if not local:
        raise HubError(
            f"None of {', '.join(wanted)} of {source} is in the local Hugging Face cache, and the Hub is not "
            f"used (HF_HUB_OFFLINE=1, or unreachable). Pull it once while online, or unset HF_HUB_OFFLINE."
        )
    if offline:
        _check_required(kind, wanted, dict.fromkeys(local), source, pinned is not None)
        commit = _snapshot_root(*next(iter(local.items()))).name
    digests: dict[str, str] = {}
    for name, path in local.items():
        expectation = listed.get(name) or cached_expectation(path, name)
        try:
            if expectation is None:
                logger.warning("%s: no listed hash for %r offline; only pins (if any) check it.", source, name)
                digests[name] = sha256_file(path)
            else:
                digests[name] = check_against_listing(path, expectation, source)
            if name in listed:  # right content, but cached under the hash the Hub's ETag named?
                check_cache_name(path, listed[name], source)
            if pinned is not None and digests[name] != pinned[name]:
                verify_digests(_snapshot_root(name, path), {name: pinned[name]}, source)
        except IntegrityError:
            evict(path)
            raise
    folder = _snapshot_root(*next(iter(local.items())))
    if not offline and revision != commit:
        _remember_ref(folder, revision or "main", str(commit))
    if kind == "adapter":
        _check_adapter_files(folder, limits.max_rank, source)
    elif kind == "router":
        check_safetensors_header(folder / ROUTER_WEIGHTS_NAME, None, source)
    logger.info("Pulled %s at commit %s (%d files verified).", repo_id, commit, len(digests))
    return PulledRepo(repo_id=repo_id, revision=revision, commit=str(commit), path=folder, files=digests,
                      from_cache=offline)


def _snapshot_root(name: str, path: Path) -> Path:
    """The snapshot folder holding ``path``, the local copy of repo file ``name`` (which may be ``a/b.json``)."""
    return path.parents[name.count("/")]


def _check_required(kind: str, wanted: Sequence[str], present: Mapping[str, Any], source: str, pinned: bool) -> None:
    required = wanted if pinned else _REQUIRED[kind]
    missing = [name for name in required if name not in present]
    if not missing:
        return
    if pinned:
        raise IntegrityError(
            f"{source} lacks the pinned file(s) {', '.join(missing)} at its pinned commit. Nothing was "
            f"loaded. The pin does not describe this repo: ask the publisher to push the mixture again."
        )
    pickles = sorted(name for name in present if is_pickle_name(name))
    if kind == "adapter" and WEIGHTS_NAME in missing and pickles:
        check_not_pickle(pickles[0], source)
    raise AdapterFormatError(
        f"{source} has no {', '.join(missing)}, so it is not a moa/PEFT {kind} repo. Files there: "
        f"{', '.join(sorted(present)[:12]) or '(none)'}. Check the repo id and revision."
    )


def _check_adapter_files(folder: Path, max_rank: int, source: str) -> None:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFormatError(f"{CONFIG_NAME} of {source} is not valid JSON: {error}.") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_NAME} of {source} must hold a JSON object.")
    check_adapter_config_ranks(config, max_rank, source)
    check_safetensors_header(folder / WEIGHTS_NAME, max_rank, source)


def pull_adapter(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    max_rank: int | None = None,
) -> Path:
    """Pull a PEFT-format adapter repo and return its local, verified folder.

    Only ``adapter_config.json``, ``adapter_model.safetensors``, ``moa.json`` and ``README.md``
    are fetched; a repo whose weights are a pickle (``adapter_model.bin``) is refused.

    Args:
        repo_id: ``owner/name``.
        revision: Branch, tag or 40-hex commit (default ``main``).
        cache_dir: HF cache folder (default huggingface_hub's; offline pulls read it).
        token: Hub token, if the repo is private.
        max_rank: Rank cap for ``r``, ``rank_pattern`` and the tensors (default 256).

    Returns:
        The folder (a snapshot in the HF cache); load it with ``model.load_adapter(folder)``.

    Raises:
        HubError: The repo, the revision or the network failed. A Hub that fails every time (5xx,
            refused, timeouts) is tried ``MOA_HUB_RETRIES`` times (default 3) and given up on within
            :func:`moa.hub.download.give_up_bound_s` (61.5 s with the defaults; about 1.5 s when it
            answers an error or refuses), see ``docs/reliability.md``.
        UnsafeFileError: An unsafe file name, or weights only as a pickle.
        IntegrityError: A downloaded file does not match the Hub's listing.
        AdapterFormatError: A file is not a valid adapter file.
        AdapterShapeError: A rank above the cap.
    """
    return fetch_verified(
        repo_id, kind="adapter", revision=revision, cache_dir=cache_dir, token=token,
        limits=Limits.from_env(max_rank),
    ).path


@dataclass(frozen=True)
class ShippedAdapter:
    """A verified adapter shipped inside the moa package (a registry entry with ``source``).

    Attributes:
        source: Its folder relative to the repository root, e.g. ``moa/demo_adapters/sql``.
        path: Local folder holding the verified files: inside the installed package, or the copy asked for.
        files: File name -> sha256 of every file.
    """

    source: str
    path: Path
    files: dict[str, str] = field(default_factory=dict)


def shipped_folder(source: str) -> Path:
    """The folder of a shipped adapter in the installed moa package.

    ``source`` is relative to the repository root and starts with ``moa/``; it is resolved
    against the installed package (``moa/demo_adapters/sql`` -> ``<moa package>/demo_adapters/sql``),
    so it works from a source checkout and from a pip install alike.

    Raises:
        RegistryError: ``source`` is not ``moa/...``, or the folder is not in the installed package.
    """
    parts = source.split("/") if isinstance(source, str) else []
    if len(parts) < 2 or parts[0] != "moa" or any(part in ("", ".", "..") for part in parts) or "\\" in source:
        raise RegistryError(
            f"Shipped adapter source {source!r} must be a folder inside the moa package, relative to the "
            f"repository root, e.g. 'moa/demo_adapters/sql'. Fix 'source' in its registry/adapters/*.toml."
        )
    package = Path(moa.__file__).resolve().parent
    folder = package.joinpath(*parts[1:])
    if not folder.is_dir():
        raise RegistryError(
            f"Shipped adapter {source!r} is not in the installed moa package (no folder {str(folder)!r}). "
            f"Reinstall moa (pip install --force-reinstall moa), or fix 'source' in its registry entry."
        )
    return folder


def fetch_shipped(
    source: str,
    *,
    pinned: Mapping[str, str],
    out: str | os.PathLike | None = None,
    limits: Limits | None = None,
) -> ShippedAdapter:
    """Verify an adapter shipped inside the moa package against its pins; no network.

    The folder must hold exactly the pinned files with the pinned sha256s (a missing, extra
    or changed file raises, naming it with both hashes); then the adapter config's ranks and
    the safetensors header are checked as for a Hub pull. With ``out``, the files are copied
    there (atomically) and the copy is verified again, so ``out`` holds exactly what was pinned.

    Args:
        source: ``moa/...`` folder, as in the registry entry.
        pinned: File name -> sha256 (the entry's ``files``).
        out: Folder to copy the verified files to (replaced if it exists); default: none, the
            package folder itself is returned.
        limits: Rank cap (default :meth:`Limits.from_env`).

    Raises:
        RegistryError: bad ``source`` or folder missing from the installed package.
        UnsafeFileError: an unsafe or pickle file name among the pins.
        IntegrityError: files differ from the pins.
        AdapterFormatError, AdapterShapeError: bad config or safetensors file.
    """
    limits = limits or Limits.from_env()
    where = f"shipped adapter {source!r}"
    for name in pinned:
        check_file_name(name, where)
        check_not_pickle(name, where)
    folder = shipped_folder(source)
    next_step = ("The installed moa package's files differ from its registry entry: reinstall moa; if the demo "
                 "adapters were retrained, run 'moa registry sync-shipped' and 'moa registry render --write'.")
    digests = verify_folder_exact(folder, pinned, where, next_step)
    _check_adapter_files(folder, limits.max_rank, where)
    if out is not None:
        folder = _copy_verified(folder, pinned, out, f"the copy of {where}")
    logger.info("Verified %s (%d files, no download) -> %s", where, len(digests), folder)
    return ShippedAdapter(source=source, path=folder, files=digests)


def pull_registered(
    name: str,
    *,
    out: str | os.PathLike | None = None,
    registry: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    max_rank: int | None = None,
) -> Path:
    """Pull a registered adapter by name, verified against the sha256s its entry pins; return its folder.

    A Hub entry is fetched at its pinned commit (a snapshot in the HF cache); a shipped entry
    is checked in the installed moa package, with no network. With ``out``, the verified files
    are copied there and that folder is returned.

    Args:
        name: A name from ``moa registry list``.
        out: Folder to copy the verified files to (replaced if it exists).
        registry: Registry folder (default ``$MOA_REGISTRY`` or the checkout's ``registry/``).
        cache_dir, token: For the Hub client (Hub entries only).
        max_rank: Rank cap (default 256).

    Raises:
        RegistryError: unknown name (listing the registered ones) or invalid registry.
        HubError, UnsafeFileError, IntegrityError, AdapterFormatError, AdapterShapeError.
    """
    from moa.hub.registry import load_registry, resolve

    entry = resolve(name, load_registry(registry))
    limits = Limits.from_env(max_rank)
    if entry.source is not None:
        return fetch_shipped(entry.source, pinned=entry.files, out=out, limits=limits).path
    pulled = fetch_verified(str(entry.repo), kind="adapter", revision=entry.revision, pinned=entry.files,
                            cache_dir=cache_dir, token=token, limits=limits)
    if out is None:
        return pulled.path
    return _copy_verified(pulled.path, entry.files, out, f"the copy of {entry.location}")


def _copy_verified(folder: Path, pinned: Mapping[str, str], out: str | os.PathLike, where: str) -> Path:
    """Copy the pinned files of a verified ``folder`` into ``out`` (atomically) and verify the copy."""
    from moa.atomic import atomic_directory

    with atomic_directory(out) as tmp:
        for name in sorted(pinned):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, tmp / name)
        verify_digests(tmp, pinned, where)
    return Path(out)


def pull_router(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> Path:
    """Pull a router repo (``router_config.json`` + ``router.safetensors``); return its verified folder."""
    return fetch_verified(repo_id, kind="router", revision=revision, cache_dir=cache_dir, token=token).path


def router_type_of(config: Any) -> str | None:
    """The router type a ``router_config.json`` names (key ``router``, ``router_type`` or ``name``)."""
    if not isinstance(config, dict):
        return None
    value = config.get("router") or config.get("router_type") or config.get("name")
    return value if isinstance(value, str) else None


def load_router_folder(folder: str | os.PathLike) -> Any | None:
    """Instantiate the router saved in ``folder`` if its type has a ``load(directory)`` classmethod.

    ``router_config.json`` names the router type under ``"router"`` (as
    :class:`~moa.routing.learned_gate.LearnedGate` writes it; ``"router_type"`` and
    ``"name"`` are accepted too); the class comes from the plugin registry (an unknown
    type raises :class:`~moa.errors.UnknownPluginError`). Returns ``None`` (with a log line) when the
    type is unknown or cannot load itself, so callers can still use the folder.
    """
    from moa.adapters.file_checks import read_json_file

    path = Path(folder)
    config = read_json_file(path / ROUTER_CONFIG_NAME, AdapterFormatError, folder=path)  # size, type, symlinks
    name = router_type_of(config)
    if name is None:
        logger.warning("%s names no router type ('router'); not instantiating it.", path / ROUTER_CONFIG_NAME)
        return None
    from moa.plugin import get_router

    router_class = get_router(name)
    loader = getattr(router_class, "load", None)
    if not callable(loader):
        logger.warning("Router type %r has no load(directory); returning only its folder.", name)
        return None
    return loader(path)


__all__ = [
    "ADAPTER_FILES",
    "MANIFEST_NAME",
    "PRETRAINED_FILES",
    "PRETRAINED_INDEX_NAME",
    "ROUTER_CONFIG_NAME",
    "ROUTER_FILES",
    "ROUTER_WEIGHTS_NAME",
    "PulledRepo",
    "ShippedAdapter",
    "check_repo_id",
    "fetch_shipped",
    "fetch_verified",
    "is_offline",
    "load_router_folder",
    "pull_adapter",
    "pull_registered",
    "pull_router",
    "router_type_of",
    "shipped_folder",
]
