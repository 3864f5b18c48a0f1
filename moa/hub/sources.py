"""Where an adapter (or a multi-adapter folder) comes from: a local folder or a Hub repo id."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from moa.adapters.peft_format import CONFIG_NAME, WEIGHTS_NAME
from moa.errors import AdapterFormatError
from moa.hub.pull import pull_adapter


def resolve_adapter_folder(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, *, max_rank: int | None = None
) -> Path:
    """A local folder for an adapter given as a folder or a Hub repo id.

    Hub repos come through :func:`pull_adapter` (from the local cache when
    ``HF_HUB_OFFLINE=1``): safe names, safetensors only, sizes, ranks (``max_rank``) and
    every file's hash are checked before the folder is returned; pickles are never fetched.
    """
    return folder_or_pulled(
        path_or_repo_id, lambda repo: pull_adapter(repo, revision=revision, max_rank=max_rank),
        f"Give the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}, or a repo id.",
    )


def folder_or_pulled(path_or_repo_id: str | os.PathLike, pull: Callable[[str], Path], next_step: str) -> Path:
    """``path_or_repo_id`` itself if it is a folder, else ``pull(repo_id)`` for an ``owner/name`` id.

    Raises:
        AdapterFormatError: neither a folder nor a repo id (``next_step`` says what to give).
    """
    path = Path(path_or_repo_id)
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        raise AdapterFormatError(f"{text!r} is neither a folder nor a Hub repo id ('owner/name'). {next_step}")
    return pull(text)
