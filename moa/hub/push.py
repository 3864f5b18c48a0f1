"""Pushing adapters and routers to the Hugging Face Hub, one commit per push.

Every push creates the repo if needed (``HfApi.create_repo(exist_ok=True)``), creates the
target branch from ``main`` if it is missing, and sends all files in a single
``HfApi.create_commit``. Only safetensors and JSON files are pushed, plus a generated
model card; pushing identical content again is a no-op that returns the current commit.

Example::

    from moa.hub import push_adapter
    result = push_adapter(model, "sql", "alice/sql-lora", domains=["sql"])
    print(result.oid, result.commit_url)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moa.adapters.peft_format import CONFIG_NAME, MOA_METADATA_NAME, WEIGHTS_NAME, read_adapter_folder
from moa.errors import AdapterFormatError, HubError
from moa.hub.model_card import render_adapter_card, render_router_card
from moa.hub.pull import (
    CARD_NAME,
    ROUTER_CONFIG_NAME,
    ROUTER_WEIGHTS_NAME,
    check_repo_id,
    hub_errors,
)
from moa.hub.verify import check_safetensors_header, is_pickle_name, sha256_file

if TYPE_CHECKING:
    from moa.model.mixture_model import MixtureModel
    from moa.routing.router import Router

logger = logging.getLogger(__name__)

_BRANCH = re.compile(r"^(?!.*\.\.)(?!.*//)[A-Za-z0-9][\w.\-/]*(?<![/.])$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class PushResult:
    """What a push created (like huggingface_hub's ``CommitInfo``, plus the file digests).

    Attributes:
        repo_id: ``owner/name``.
        revision: The branch pushed to.
        oid: The commit id (40 hex) the branch now points at.
        commit_url: URL of that commit on the Hub.
        files: File name -> sha256 of every file in the commit.
    """

    repo_id: str
    revision: str
    oid: str
    commit_url: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def commit(self) -> str:
        """Alias of :attr:`oid`."""
        return self.oid


def check_branch(revision: str | None) -> str:
    """The branch to push to (``main`` by default); refuse commit ids and malformed names."""
    branch = revision or "main"
    if _HEX40.match(branch) or not _BRANCH.match(branch):
        raise HubError(
            f"Cannot push to revision {branch!r}: pushes go to a branch name (letters, digits, '-', '_', "
            f"'.', '/'), not a commit id or tag. Pass revision='main' or a branch such as 'dev'."
        )
    return branch


def push_files(
    repo_id: str,
    files: Mapping[str, Path | bytes],
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str = "Upload with moa",
    token: str | None = None,
) -> PushResult:
    """Push ``files`` (name in repo -> local path or content) to a branch in one commit.

    Raises:
        HubError: the Hub refused or could not be reached.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)
    branch = check_branch(revision)
    digests: dict[str, str] = {}
    operations = []
    for name, content in sorted(files.items()):
        if is_pickle_name(name):
            raise AdapterFormatError(f"Refusing to push {name!r}: moa never publishes pickle files.")
        if isinstance(content, bytes):
            digests[name] = hashlib.sha256(content).hexdigest()
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
        else:
            digests[name] = sha256_file(content)
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(content)))
    api = HfApi(token=token)
    with hub_errors(repo_id, branch, "push to"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=branch)
    logger.info("Pushed %d files to %s@%s: commit %s.", len(operations), repo_id, branch, info.oid)
    return PushResult(repo_id=repo_id, revision=branch, oid=str(info.oid), commit_url=str(info.commit_url),
                      files=digests)


def push_adapter_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    domains: Sequence[str] = (),
    license: str | None = None,  # noqa: A002 - the Hub's name
    metrics: Mapping[str, float] | None = None,
    description: str | None = None,
    model_card: bool | str = True,
) -> PushResult:
    """Push a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    The folder is read and checked first (valid JSON, readable safetensors, no pickle
    weights). ``moa.json`` goes along when present; other files are not pushed.

    Args:
        folder: The adapter folder (as written by ``model.save_adapter`` or PEFT).
        repo_id: ``owner/name``; created if missing.
        revision: Branch (default ``main``); created from ``main`` if missing.
        private: Create the repo private (an existing repo keeps its visibility).
        commit_message: Defaults to ``"Upload <type> adapter with moa"``.
        token: Hub token (default: the logged-in one).
        domains, license, metrics, description: For the model card.
        model_card: ``True`` generates README.md, a string is pushed as README.md, ``False`` pushes none.

    Returns:
        The commit (see :class:`PushResult`).
    """
    path = Path(folder)
    adapter = read_adapter_folder(path)  # raises AdapterFormatError on anything unusable
    names = [n for n in (CONFIG_NAME, WEIGHTS_NAME, MOA_METADATA_NAME) if (path / n).is_file()]
    skipped = sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in names and p.name != CARD_NAME)
    if skipped:
        logger.info("Not pushing %s from %s (moa pushes only %s).", skipped, path, names)
    files: dict[str, Path | bytes] = {name: path / name for name in names}
    adapter_type = str(adapter.moa.get("adapter_type") or adapter.metadata.get("moa.adapter_type")
                       or str(adapter.config.get("peft_type", "lora")).lower())
    if model_card is not False:
        base = dict(adapter.moa.get("base") or {})
        base.setdefault("model_id", adapter.config.get("base_model_name_or_path"))
        base.setdefault("fingerprint", adapter.base_fingerprint)
        card = model_card if isinstance(model_card, str) else render_adapter_card(
            repo_id=repo_id, config=adapter.config, base=base, adapter_type=adapter_type, domains=domains,
            license=license, metrics=metrics, description=description,
            files={name: sha256_file(p) for name, p in files.items() if isinstance(p, Path)},
        )
        files[CARD_NAME] = card.encode()
    return push_files(repo_id, files, revision=revision, private=private, token=token,
                      commit_message=commit_message or f"Upload {adapter_type} adapter with moa")


def push_adapter(
    model: MixtureModel,
    name: str,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    **card: Any,
) -> PushResult:
    """Save adapter ``name`` of ``model`` in PEFT's layout and push it with a model card.

    Args:
        model: The MixtureModel holding the adapter.
        name: Adapter name in the model.
        repo_id: ``owner/name``; created if missing.
        revision: Branch (default ``main``); created if missing.
        private: Create the repo private.
        commit_message: Commit message.
        token: Hub token.
        **card: ``domains``, ``license``, ``metrics``, ``description``, ``model_card`` (see
            :func:`push_adapter_folder`).

    Returns:
        :class:`PushResult` with the commit id (``oid``), ``commit_url`` and file sha256s.

    Example:
        >>> push_adapter(model, "sql", "alice/sql-lora", domains=["sql"])  # doctest: +SKIP
    """
    check_repo_id(repo_id)
    check_branch(revision)
    with tempfile.TemporaryDirectory(prefix="moa-push-") as tmp:
        folder = Path(tmp) / "adapter"
        model.save_adapter(name, folder)
        return push_adapter_folder(folder, repo_id, revision=revision, private=private,
                                   commit_message=commit_message, token=token, **card)


def push_router(
    router: Router | str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    license: str | None = None,  # noqa: A002
) -> PushResult:
    """Push a router: a folder with ``router_config.json`` + ``router.safetensors``, or a
    :class:`~moa.routing.Router` that has ``save(directory)``.

    Raises:
        AdapterFormatError: the folder lacks one of the two files, or they are unreadable.
        HubError: the router cannot be saved, or the Hub refused.
    """
    check_repo_id(repo_id)
    check_branch(revision)
    with tempfile.TemporaryDirectory(prefix="moa-push-router-") as tmp:
        if isinstance(router, (str, os.PathLike)):
            folder = Path(router)
        else:
            save = getattr(router, "save", None)
            if not callable(save):
                raise HubError(
                    f"Router {router!r} has no save(directory) method, so moa cannot publish it. Save it "
                    f"as a folder with {ROUTER_CONFIG_NAME} + {ROUTER_WEIGHTS_NAME} and push that folder."
                )
            folder = Path(tmp) / "router"
            save(folder)
        return _push_router_folder(folder, repo_id, revision, private, commit_message, token, license)


def _push_router_folder(
    folder: Path, repo_id: str, revision: str | None, private: bool, message: str | None, token: str | None,
    license: str | None,  # noqa: A002
) -> PushResult:
    missing = [n for n in (ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise AdapterFormatError(
            f"Router folder {str(folder)!r} lacks {', '.join(missing)}. A router folder holds "
            f"{ROUTER_CONFIG_NAME} and {ROUTER_WEIGHTS_NAME}."
        )
    try:
        config = json.loads((folder / ROUTER_CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFormatError(f"{str(folder / ROUTER_CONFIG_NAME)!r} is not valid JSON: {error}.") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{str(folder / ROUTER_CONFIG_NAME)!r} must hold a JSON object.")
    check_safetensors_header(folder / ROUTER_WEIGHTS_NAME, None, f"router folder {str(folder)!r}")
    files: dict[str, Path | bytes] = {n: folder / n for n in (ROUTER_CONFIG_NAME, ROUTER_WEIGHTS_NAME)}
    card = render_router_card(repo_id=repo_id, config=config, license=license,
                              files={n: sha256_file(p) for n, p in files.items() if isinstance(p, Path)})
    files[CARD_NAME] = card.encode()
    return push_files(repo_id, files, revision=revision, private=private, token=token,
                      commit_message=message or "Upload router with moa")


__all__ = ["PushResult", "check_branch", "push_adapter", "push_adapter_folder", "push_files", "push_router"]
