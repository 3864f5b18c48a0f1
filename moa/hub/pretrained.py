"""PEFT's multi-adapter ``save_pretrained`` / ``push_to_hub`` layout for a MixtureModel.

One folder (or Hub repo) holds several adapters::

    save_directory/
      adapter_config.json            <- the FIRST selected adapter, at the root
      adapter_model.safetensors
      moa.json
      moa_adapters.json              <- moa's index: which adapter is where, the active ones, sha256s
      code/adapter_config.json       <- every other adapter in a subfolder named after it
      code/adapter_model.safetensors
      ...

PEFT reads it as it is: ``PeftModel.from_pretrained(base, dir, adapter_name=first)`` loads the
root adapter and ``peft_model.load_adapter(f"{dir}/{name}", adapter_name=name)`` (or, from the
Hub, ``load_adapter(repo_id, adapter_name=name, subfolder=name)``) each other one. moa reads
every adapter back with :func:`load_pretrained_adapters`, from the index, or from a layout
PEFT wrote (root adapter as ``"default"``, plus each subfolder holding ``adapter_config.json``).
Nothing is pickled; the index is JSON.

The functions take the model first, so they can be called directly or through thin
``MixtureModel`` methods of the same names. They use the model's public API only
(``adapter_names``, ``peft_config``, ``save_adapter``, ``load_adapter``, ``delete_adapter``,
``active_adapters``, ``set_adapter``).

Example::

    from moa.hub.pretrained import load_pretrained_adapters, push_to_hub, save_pretrained

    save_pretrained(model, "out/all")                        # every adapter, slot order
    save_pretrained(model, "out/two", selected_adapters=["sql", "code"])
    load_pretrained_adapters(other_model, "out/all")         # all of them, or none
    result = push_to_hub(model, "alice/domain-adapters")     # one commit, with a model card
    load_pretrained_adapters(other_model, "alice/domain-adapters", revision=result.oid)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moa.adapters.peft_format import CONFIG_NAME, MOA_METADATA_NAME, PICKLE_NAMES, WEIGHTS_NAME
from moa.atomic import atomic_directory
from moa.errors import (
    AdapterError,
    AdapterExistsError,
    AdapterFormatError,
    UnknownAdapterError,
    format_choices,
)
from moa.hub.pull import CARD_NAME, check_repo_id
from moa.hub.sources import folder_or_pulled
from moa.hub.pretrained_index import (
    FOLDER_NAME,
    INDEX_FORMAT,
    INDEX_NAME,
    ROOT,
    PretrainedIndex,
    read_index,
    read_index_file,
)
from moa.hub.verify import sha256_file

if TYPE_CHECKING:
    from moa.hub.push import PushResult
    from moa.model.mixture_model import MixtureModel

logger = logging.getLogger(__name__)

#: Root entries that belong to the adapters saved there; a new save replaces them, other entries are kept.
_ROOT_ADAPTER_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, MOA_METADATA_NAME, INDEX_NAME, *PICKLE_NAMES})
#: Keyword arguments of PEFT's ``save_pretrained`` that moa understands.
_PEFT_SAVE_KWARGS = ("safe_serialization", "is_main_process", "save_embedding_layers")


# --- save ------------------------------------------------------------------------------------


def save_pretrained(
    model: MixtureModel,
    save_directory: str | os.PathLike,
    selected_adapters: Sequence[str] | str | None = None,
    **kwargs: Any,
) -> Path:
    """Save several adapters in PEFT's multi-adapter layout, atomically.

    The first selected adapter goes to the root of ``save_directory``, each other one to
    ``save_directory/<name>/``; ``moa_adapters.json`` records where each is, which were
    active and every file's sha256. The whole folder is written next to the target and
    renamed into place: on any error nothing partial remains and an existing folder is left
    as it was. An existing folder's other content (a tokenizer, a README, checkpoints...) is
    kept; the adapters of an earlier save there (root adapter files, the subfolders its index
    lists or this save writes) are replaced.

    Args:
        model: The MixtureModel holding the adapters.
        save_directory: The folder to write (created, or replaced as described above).
        selected_adapters: Adapter names to save, the first at the root (default: every
            loaded adapter in slot order). A single name may be given as a string.
        **kwargs: PEFT's ``safe_serialization`` (only ``True``: moa never writes pickle),
            ``is_main_process`` (``False`` writes nothing, as in PEFT) and
            ``save_embedding_layers`` (ignored: moa adapters hold no embedding layers).

    Returns:
        ``save_directory`` as a :class:`~pathlib.Path`.

    Raises:
        UnknownAdapterError: a selected name is not loaded (the message lists the loaded ones).
        AdapterError: the model has no adapters, nothing was selected, an unsupported
            keyword, ``save_directory`` is a file or the working directory, or an adapter name
            that cannot be a subfolder (or clashes with other content of the folder).

    Example:
        >>> save_pretrained(model, "out/adapters", selected_adapters=["sql", "code"])  # doctest: +SKIP
    """
    main_process = _check_save_kwargs(kwargs)
    names = _selected(model, selected_adapters)
    if not main_process:
        logger.info("save_pretrained: is_main_process=False, nothing written to %s.", save_directory)
        return Path(save_directory)
    target = Path(save_directory)
    _check_target(target)
    folders = {name: ROOT if i == 0 else name for i, name in enumerate(names)}
    _check_folder_names(folders)
    kept = _entries_to_keep(target, set(folders.values()) - {ROOT})
    active = tuple(a for a in model.active_adapters if a in folders)
    with atomic_directory(target) as tmp:
        _save_root_adapter(model, names[0], tmp)
        for name in names[1:]:
            model.save_adapter(name, tmp / folders[name])
        files = _digests(tmp, folders.values())
        (tmp / INDEX_NAME).write_text(PretrainedIndex(folders, active, files).to_json())
        for entry in kept:
            _link_or_copy(entry, tmp / entry.name)
    logger.info("Saved %d adapters to %s (%s at the root%s).", len(names), target, names[0],
                f"; {', '.join(names[1:])} in subfolders" if len(names) > 1 else "")
    return target


def _check_save_kwargs(kwargs: dict[str, Any]) -> bool:
    """Validate PEFT's extra ``save_pretrained`` keywords; ``False`` means "not the main process"."""
    unknown = sorted(set(kwargs) - set(_PEFT_SAVE_KWARGS))
    if unknown:
        raise AdapterError(
            f"save_pretrained got unsupported keyword(s) {', '.join(unknown)}. Supported: "
            f"selected_adapters, {', '.join(_PEFT_SAVE_KWARGS)}. Check the spelling (e.g. "
            f"'selected_adapters', plural)."
        )
    if kwargs.get("safe_serialization", True) is not True:
        raise AdapterError(
            f"save_pretrained(safe_serialization={kwargs['safe_serialization']!r}): moa writes safetensors only, "
            f"never pickle. Drop the argument (or pass safe_serialization=True)."
        )
    if kwargs.get("save_embedding_layers") is True:
        logger.warning("save_pretrained: save_embedding_layers=True is ignored; moa adapters hold no embedding "
                       "layers, so there are none to save.")
    return bool(kwargs.get("is_main_process", True))


def _selected(model: MixtureModel, selected_adapters: Sequence[str] | str | None) -> list[str]:
    """The adapter names to save, checked, duplicates dropped, order kept."""
    loaded = list(model.adapter_names)
    if not loaded:
        raise AdapterError(
            "save_pretrained: the model has no adapters, so there is nothing to save. Add one with "
            "model.add_adapter(name, config) or model.load_adapter(path, adapter_name=name) first."
        )
    if selected_adapters is None:
        return loaded
    names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
    if not names:
        raise AdapterError(
            f"save_pretrained: selected_adapters is empty, so there is nothing to save. Loaded: "
            f"{format_choices(loaded)}. Pass some of them, or None for all."
        )
    unknown = [name for name in names if name not in model.peft_config]
    if unknown:
        raise UnknownAdapterError(
            f"save_pretrained: no adapter named {', '.join(map(repr, unknown))}. Loaded: {format_choices(loaded)}. "
            f"Pick from those, or load it first with model.load_adapter(path, adapter_name=...)."
        )
    return list(dict.fromkeys(names))


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise AdapterError(
            f"save_pretrained: {str(target)!r} is a file, not a folder. Give a folder path (it is created)."
        )
    resolved, cwd = target.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise AdapterError(
            f"save_pretrained: {str(target)!r} is the working directory (or holds it), which cannot be replaced "
            f"atomically. Save into a subfolder, e.g. {str(target / 'adapters')!r}."
        )


def _check_folder_names(folders: dict[str, str]) -> None:
    """Every subfolder must be one safe path component that no root file uses, unique ignoring case."""
    seen: dict[str, str] = {}
    for name, folder in folders.items():
        if folder == ROOT:
            continue
        if not FOLDER_NAME.match(folder) or folder in _ROOT_ADAPTER_FILES or folder == CARD_NAME:
            raise AdapterError(
                f"save_pretrained: adapter name {name!r} cannot be a subfolder next to the root adapter's files "
                f"({', '.join(sorted(_ROOT_ADAPTER_FILES))}): use letters, digits, '_' and '-' only. Rename "
                f"it (save it under another name with model.save_adapter, then load_adapter) or save it first "
                f"so it goes to the root."
            )
        other = seen.setdefault(folder.lower(), name)
        if other != name:
            raise AdapterError(
                f"save_pretrained: adapters {other!r} and {name!r} differ only in case, so their subfolders "
                f"would be the same folder on case-insensitive file systems (macOS, Windows). Save them to "
                f"different folders (selected_adapters=...), or rename one."
            )


def _entries_to_keep(target: Path, subfolders: set[str]) -> list[Path]:
    """Entries of an existing ``target`` to carry into the new folder: everything but its adapters.

    Dropped: the root adapter's files and the index, the subfolders the old index lists,
    and adapter folders (holding ``adapter_config.json``) where this save writes an adapter.
    Other subfolders stay, even ones holding an adapter (a Trainer ``checkpoint-N``, a PEFT
    adapter saved there by hand): the new index simply does not list them.
    """
    if not target.is_dir():
        return []
    old_folders: set[str] = set()
    if (target / INDEX_NAME).is_file():
        try:
            old_folders = set(read_index_file(target / INDEX_NAME).adapters.values())
        except AdapterFormatError as error:
            logger.warning("Ignoring the damaged index of %s, which this save replaces: %s", target, error)
    kept = []
    for entry in sorted(target.iterdir()):
        name = entry.name
        if name in _ROOT_ADAPTER_FILES or name in old_folders:
            continue
        if name in subfolders:
            if entry.is_dir() and not entry.is_symlink() and (entry / CONFIG_NAME).is_file():
                continue  # an earlier save of this adapter (moa or PEFT): replaced
            raise AdapterError(
                f"save_pretrained: {str(entry)!r} already exists and is not an adapter folder, but adapter "
                f"{name!r} would be saved there. Nothing was written. Move it away, or save to another folder."
            )
        kept.append(entry)
    return kept


def _save_root_adapter(model: MixtureModel, name: str, root: Path) -> None:
    """Save ``name`` in a staging subfolder of ``root`` (no adapter name has a '.'), then move its files up."""
    staging = root / ".root-adapter"
    model.save_adapter(name, staging)
    for entry in sorted(staging.iterdir()):
        os.replace(entry, root / entry.name)
    staging.rmdir()


def _digests(root: Path, folders: Iterable[str]) -> dict[str, str]:
    """Relative path -> sha256 of every file of the adapter folders under ``root``."""
    files: dict[str, str] = {}
    for folder in folders:
        base = root if folder == ROOT else root / folder
        for path in sorted(base.iterdir()):
            if path.is_file():
                files[path.relative_to(root).as_posix()] = sha256_file(path)
    return files


def _link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link (or, across devices, copy) a file or folder; symlinks stay symlinks."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        shutil.copytree(source, destination, symlinks=True, copy_function=link)
    else:
        link(str(source), str(destination))


# --- the index -------------------------------------------------------------------------------


def load_pretrained_adapters(
    model: MixtureModel,
    directory: str | os.PathLike,
    *,
    revision: str | None = None,
    is_trainable: bool = False,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
) -> list[str]:
    """Load every adapter of a multi-adapter folder (or Hub repo) into ``model``, all or nothing.

    The folder is read as :func:`read_index` describes. A Hub repo id (``owner/name``, when
    no such local folder exists) is pulled first with :func:`pull_pretrained`, which checks
    every file against the sha256s its index pins (a local folder is read as it is: its
    adapters may have been re-saved since). If loading one adapter fails, those
    already loaded by this call are deleted again and the error is re-raised. When the model
    had no adapters before, the adapters that were active when saved become active.

    Args:
        model: The MixtureModel to load into.
        directory: The folder written by :func:`save_pretrained` (or PEFT), or a Hub repo id.
        revision: Branch, tag or commit, for a Hub repo.
        is_trainable: Load the adapters trainable (as ``model.load_adapter``).
        cache_dir: For the Hub client, for a Hub repo.
        token: For the Hub client, for a Hub repo.

    Returns:
        The loaded adapter names, in load order (the root adapter first).

    Raises:
        AdapterFormatError: no adapter found, or a damaged index.
        AdapterExistsError: an adapter name is already loaded (nothing is loaded).
        HubError, IntegrityError, UnsafeFileError: from a Hub pull.
        MoaError: Any error of ``model.load_adapter`` (nothing stays loaded).
    """
    root = _local_folder(directory, revision, cache_dir, token, model.max_rank)
    index = read_index(root)
    taken = [name for name in index.adapters if name in model.peft_config]
    if taken:
        raise AdapterExistsError(
            f"{str(directory)!r} brings adapter(s) {', '.join(map(repr, taken))}, already loaded in this model "
            f"(loaded: {format_choices(model.adapter_names)}). Nothing was loaded. Delete them first "
            f"(model.delete_adapter(name)) or use a fresh model."
        )
    was_empty = not model.adapter_names
    loaded: list[str] = []
    try:
        for name, folder in index.adapters.items():
            model.load_adapter(root / folder, adapter_name=name, is_trainable=is_trainable)
            loaded.append(name)
    except BaseException:
        for name in reversed(loaded):
            with contextlib.suppress(Exception):  # keep the original error
                model.delete_adapter(name)
        if loaded:
            logger.warning("Loading %s failed; removed the adapters it had loaded (%s).", directory, ", ".join(loaded))
        raise
    if was_empty and index.active:
        model.set_adapter(list(index.active))
    logger.info("Loaded %d adapters from %s: %s.", len(loaded), directory, ", ".join(loaded))
    return loaded


def _local_folder(
    directory: str | os.PathLike, revision: str | None, cache_dir: Any, token: str | None, max_rank: int | None
) -> Path:
    return folder_or_pulled(
        directory,
        lambda repo: pull_pretrained(repo, revision=revision, cache_dir=cache_dir, token=token, max_rank=max_rank),
        "Give the folder written by save_pretrained, or a repo written by push_to_hub.",
    )


def pull_pretrained(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    max_rank: int | None = None,
) -> Path:
    """Pull a multi-adapter repo pushed by :func:`push_to_hub`; return its verified local folder.

    The index is fetched first (checked against the Hub's listing); then, at the same
    commit, exactly the files it lists, each checked against the listing and the sha256 the
    index pins; then every adapter's config and safetensors header (ranks under ``max_rank``).

    Args:
        repo_id: ``owner/name``.
        revision: Branch, tag or commit (default ``main``).
        cache_dir: HF cache folder (default huggingface_hub's).
        token: Hub token, if the repo is private.
        max_rank: Rank cap (default 256).

    Returns:
        The snapshot folder (in the HF cache), laid out as :func:`save_pretrained` writes it.

    Raises:
        AdapterFormatError: no index, or an index without ``files`` (not pushed by moa).
        HubError, UnsafeFileError, IntegrityError, AdapterShapeError.
    """
    from moa.hub.pull import _check_adapter_files, fetch_verified
    from moa.hub.verify import Limits

    limits = Limits.from_env(max_rank)
    head = fetch_verified(repo_id, kind="pretrained", revision=revision, cache_dir=cache_dir, token=token,
                          limits=limits)
    index = read_index_file(head.path / INDEX_NAME)
    source = f"Hub repo {repo_id!r} at commit {head.commit}"
    if not index.files:
        raise AdapterFormatError(
            f"{INDEX_NAME} of {source} pins no files, so moa cannot verify them. Push it again with moa's "
            f"push_to_hub, or download it with huggingface_hub.snapshot_download and pass the folder."
        )
    for name, folder in index.adapters.items():
        prefix = "" if folder == ROOT else f"{folder}/"
        missing = [f"{prefix}{n}" for n in (CONFIG_NAME, WEIGHTS_NAME) if f"{prefix}{n}" not in index.files]
        if missing:
            raise AdapterFormatError(
                f"{INDEX_NAME} of {source} lists adapter {name!r} in {folder!r} but pins no {', '.join(missing)}. "
                f"Push it again with moa's push_to_hub."
            )
    fetch_verified(repo_id, kind="pretrained", revision=head.commit, pinned=index.files, cache_dir=cache_dir,
                   token=token, limits=limits)
    for name, folder in index.adapters.items():
        _check_adapter_files(head.path / folder, limits.max_rank, f"adapter {name!r} of {source}")
    return head.path


# --- push ------------------------------------------------------------------------------------


def push_to_hub(
    model: MixtureModel,
    repo_id: str,
    selected_adapters: Sequence[str] | str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    *,
    license: str | None = None,  # noqa: A002 - the Hub's name
    description: str | None = None,
    model_card: bool | str = True,
) -> PushResult:
    """Push several adapters in the :func:`save_pretrained` layout, with a model card, in one commit.

    The repo is created if missing and the branch from ``main`` if missing (as
    :func:`moa.hub.push_adapter`). Only the adapter files (JSON and safetensors), the index
    and ``README.md`` are pushed; files of an earlier push that are not part of this one stay
    in the repo, but the index names exactly the adapters of this push.

    Args:
        model: The MixtureModel holding the adapters.
        repo_id: ``owner/name``.
        selected_adapters: Adapter names, the first at the root (default: all, slot order).
        revision: Branch (default ``main``).
        private: Create the repo private (an existing repo keeps its visibility).
        commit_message: Default ``"Upload N adapters with moa: a, b, c"``.
        token: Hub token (default: the logged-in one).
        license: Hub license id for the card.
        description: One paragraph for the card.
        model_card: ``True`` generates README.md, a string is pushed as README.md, ``False`` pushes none.

    Returns:
        The commit (:class:`moa.hub.PushResult`: ``oid``, ``revision``, ``commit_url``, file sha256s).

    Raises:
        UnknownAdapterError, AdapterError: as :func:`save_pretrained`.
        HubError: a bad repo id or branch, or the Hub refused.
    """
    from moa.hub.push import check_branch, push_files

    check_repo_id(repo_id)
    check_branch(revision)
    with tempfile.TemporaryDirectory(prefix="moa-push-pretrained-") as tmp:
        folder = save_pretrained(model, Path(tmp) / "adapters", selected_adapters)
        index = read_index_file(folder / INDEX_NAME)
        files: dict[str, Path | bytes] = {name: folder / name for name in index.files or {}}
        files[INDEX_NAME] = folder / INDEX_NAME
        if model_card is not False:
            card = model_card if isinstance(model_card, str) else _card(
                folder, index, repo_id, license, description,
                {name: sha256_file(path) for name, path in files.items() if isinstance(path, Path)},
            )
            files[CARD_NAME] = card.encode()
        names = list(index.adapters)
        message = commit_message or f"Upload {len(names)} adapter{'s' if len(names) > 1 else ''} with moa: " + \
            ", ".join(names)
        return push_files(repo_id, files, revision=revision, private=bool(private), commit_message=message,
                          token=token)


def _card(folder: Path, index: PretrainedIndex, repo_id: str, license: str | None,  # noqa: A002
          description: str | None, files: dict[str, str]) -> str:
    from moa.hub.model_card import render_pretrained_card

    def read_json(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return data if isinstance(data, dict) else {}

    adapters = {name: (sub, read_json(folder / sub / CONFIG_NAME)) for name, sub in index.adapters.items()}
    first = next(iter(index.adapters.values()))
    base = dict(read_json(folder / first / MOA_METADATA_NAME).get("base") or {})
    return render_pretrained_card(repo_id=repo_id, adapters=adapters, base=base, active=index.active,
                                  license=license, description=description, files=files)


__all__ = [
    "INDEX_FORMAT",
    "INDEX_NAME",
    "PretrainedIndex",
    "load_pretrained_adapters",
    "pull_pretrained",
    "push_to_hub",
    "read_index",
    "save_pretrained",
]
