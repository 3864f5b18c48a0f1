"""The index of a multi-adapter folder (``moa_adapters.json``): which adapter is where.

Written by :func:`moa.hub.pretrained.save_pretrained`; read back (or reconstructed from a
folder PEFT wrote) by :func:`read_index`. JSON only, every name and digest checked.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import moa
from moa.adapters.peft_format import CONFIG_NAME
from moa.errors import AdapterFormatError, UnsafeFileError, format_choices
from moa.hub.pull import PRETRAINED_INDEX_NAME
from moa.hub.verify import check_file_name, check_sha256_hex, is_pickle_name

logger = logging.getLogger(__name__)

#: File name of the index at the root of a multi-adapter folder.
INDEX_NAME = PRETRAINED_INDEX_NAME
#: Version of the index format this moa writes and reads.
INDEX_FORMAT = 1
#: The folder of the root adapter in the index.
ROOT = "."
#: The adapter name PEFT gives the adapter at the root of a folder it wrote.
PEFT_DEFAULT_NAME = "default"
#: A name that can be a subfolder: what MixtureModel accepts as an adapter name (no '.', no '/').
FOLDER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class PretrainedIndex:
    """The contents of ``moa_adapters.json`` (or the equivalent found in a PEFT-written folder).

    Attributes:
        adapters: Adapter name -> its folder relative to the root (``"."`` = the root), in load order.
        active: The adapters active when saved (may be empty).
        files: Relative POSIX path -> sha256 of every adapter file (empty when not recorded).
    """

    adapters: dict[str, str]
    active: tuple[str, ...] = ()
    files: dict[str, str] | None = None

    def to_json(self) -> str:
        """The index as JSON text (keys in a fixed order, adapters in load order)."""
        data: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "adapters": dict(self.adapters),
            "active": list(self.active),
            "files": dict(sorted((self.files or {}).items())),
            "moa_version": moa.__version__,
        }
        return json.dumps(data, indent=2) + "\n"


def read_index(directory: str | os.PathLike) -> PretrainedIndex:
    """The adapters of a multi-adapter folder: from ``moa_adapters.json``, else from PEFT's layout.

    Without the index, the root adapter (if ``adapter_config.json`` is at the root) is
    ``"default"``, as PEFT names it, and every subfolder holding ``adapter_config.json`` is an
    adapter named after the subfolder (sorted by name).

    Raises:
        AdapterFormatError: not a folder, an invalid index, a listed folder without
            ``adapter_config.json``, or no adapter at all.
    """
    root = Path(directory)
    if not root.is_dir():
        raise AdapterFormatError(
            f"{str(root)!r} is not a folder. Give the folder written by save_pretrained (or PEFT's "
            f"save_pretrained), or a Hub repo id 'owner/name'."
        )
    if (root / INDEX_NAME).is_file():
        index = read_index_file(root / INDEX_NAME)
    else:
        adapters = {PEFT_DEFAULT_NAME: ROOT} if (root / CONFIG_NAME).is_file() else {}
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
            adapters.setdefault(sub.name, sub.name)
        if not adapters:
            raise AdapterFormatError(
                f"{str(root)!r} holds no adapter: no {INDEX_NAME}, no {CONFIG_NAME} at its root or in a subfolder. "
                f"Entries there: {', '.join(sorted(p.name for p in root.iterdir())[:12]) or '(none)'}. Give the "
                f"folder written by save_pretrained."
            )
        index = PretrainedIndex(adapters)
        logger.info("%s has no %s; read PEFT's layout: %s.", root, INDEX_NAME, ", ".join(adapters))
    for name, folder in index.adapters.items():
        if not (root / folder / CONFIG_NAME).is_file():
            raise AdapterFormatError(
                f"Adapter {name!r} of {str(root)!r} should be in {folder!r}, but {str(root / folder / CONFIG_NAME)!r} "
                f"does not exist. The folder is incomplete: save it again with save_pretrained."
            )
    return index


def read_index_file(path: Path) -> PretrainedIndex:
    """Parse and validate ``moa_adapters.json``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFormatError(f"{str(path)!r} is not valid JSON ({error}). Save the folder again.") from error

    def bad(what: str, value: Any, expected: str) -> AdapterFormatError:
        return AdapterFormatError(
            f"{str(path)!r}: {what} is {value!r}, expected {expected}. The index is damaged or was not written "
            f"by moa: save the folder again with save_pretrained (or delete {INDEX_NAME} to read PEFT's layout)."
        )

    if not isinstance(data, dict):
        raise bad("the content", type(data).__name__, "a JSON object")
    if data.get("format") != INDEX_FORMAT:
        raise AdapterFormatError(
            f"{str(path)!r} has index format {data.get('format')!r}; this moa ({moa.__version__}) reads format "
            f"{INDEX_FORMAT}. Upgrade moa (pip install -U moa) to read it."
        )
    adapters = data.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise bad("'adapters'", adapters, "a non-empty object {name: folder}")
    used: set[str] = set()
    for name, folder in adapters.items():
        if not isinstance(folder, str) or (folder != ROOT and not is_safe_folder(folder)) or folder in used:
            raise bad(f"the folder of adapter {name!r}", folder,
                      "'.' (the root) or a relative subfolder without '..', used by one adapter only")
        used.add(folder)
    active = data.get("active", [])
    if not isinstance(active, list) or any(a not in adapters for a in active):
        raise bad("'active'", active, f"a list of adapter names among {format_choices(adapters)}")
    files = data.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise bad("'files'", type(files).__name__, "an object {path: sha256}")
        for name, digest in files.items():
            check_file_name(name, str(path))
            if is_pickle_name(name):
                raise bad("a listed file", name, "safetensors or JSON files only (never pickle)")
            check_sha256_hex(digest, f"sha256 of {name!r} in {path}")
    return PretrainedIndex(dict(adapters), tuple(active), dict(files) if files is not None else None)


def is_safe_folder(folder: str) -> bool:
    try:
        check_file_name(folder)
    except UnsafeFileError:
        return False
    return True


# --- load ------------------------------------------------------------------------------------
