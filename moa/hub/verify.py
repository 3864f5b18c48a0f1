"""Checks on files that come from the Hub (or ship inside moa): names, formats, sizes, ranks and hashes.

Everything here runs *before* a byte is loaded into a model: file names from a listing
(never absolute, never ``..``, never a backslash), the format (safetensors only, pickles
are refused), sizes against caps, adapter ranks from ``adapter_config.json`` and from the
safetensors header against a cap, and every file's hash against the one the Hub listed
or a manifest pinned.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa.adapters.file_checks import check_config_ranks
from moa.adapters.file_checks import check_safetensors_header as check_header
from moa.errors import AdapterFormatError, AdapterShapeError, IntegrityError, UnsafeFileError

#: File name endings of pickle-based formats (loading one can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill")
#: Environment variables that override the default caps.
MAX_FILE_BYTES_ENV = "MOA_HUB_MAX_FILE_BYTES"
MAX_TOTAL_BYTES_ENV = "MOA_HUB_MAX_TOTAL_BYTES"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Caps applied to what is pulled from the Hub.

    Attributes:
        max_file_bytes: Largest single file accepted (default 4 GiB, env ``MOA_HUB_MAX_FILE_BYTES``).
        max_total_bytes: Largest sum of the files of one repo (default 16 GiB, env ``MOA_HUB_MAX_TOTAL_BYTES``).
        max_files: Most files one repo may list.
        max_rank: Largest adapter rank accepted (``r``, every ``rank_pattern`` value, tensor shapes).
    """

    max_file_bytes: int = 4 * 1024**3
    max_total_bytes: int = 16 * 1024**3
    max_files: int = 10_000
    max_rank: int = 256

    @classmethod
    def from_env(cls, max_rank: int | None = None) -> Limits:
        """Defaults, overridden by the environment variables and ``max_rank`` when given."""
        defaults = cls()
        return cls(
            max_file_bytes=_env_int(MAX_FILE_BYTES_ENV, defaults.max_file_bytes),
            max_total_bytes=_env_int(MAX_TOTAL_BYTES_ENV, defaults.max_total_bytes),
            max_files=defaults.max_files,
            max_rank=defaults.max_rank if max_rank is None else int(max_rank),
        )


@dataclass(frozen=True)
class RemoteFile:
    """One file as the Hub lists it at a commit.

    Attributes:
        path: Path in the repo.
        size: Size in bytes (``None`` when unknown).
        blob_id: Git blob id (of the content, or of the LFS pointer for LFS files).
        lfs_sha256: sha256 of the content for LFS files, else ``None``.
    """

    path: str
    size: int | None = None
    blob_id: str | None = None
    lfs_sha256: str | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError as error:
        raise UnsafeFileError(f"{name}={value!r} is not an integer number of bytes. Unset it or give e.g. "
                              f"{name}={default}.") from error


def check_file_name(path: str, source: str = "the Hub") -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise :class:`UnsafeFileError`.

    Refused: empty names, absolute paths (``/x``, ``C:x``), ``..`` or ``.`` components,
    empty components (``a//b``), backslashes, control characters, a leading ``~``.
    """
    parts = path.split("/") if isinstance(path, str) else []
    unsafe = (
        not isinstance(path, str)
        or not path
        or path.startswith(("/", "~"))
        or "\\" in path
        or re.match(r"^[A-Za-z]:", path) is not None
        or any(ord(c) < 32 for c in path)
        or any(part in ("", ".", "..") for part in parts)
    )
    if unsafe:
        raise UnsafeFileError(
            f"Refusing file name {path!r} from {source}: file names must be relative paths without "
            f"'..', '.', empty parts, backslashes or a drive/absolute prefix (path traversal). "
            f"Nothing was downloaded or loaded. Report the repo to its owner."
        )
    return path


def is_pickle_name(path: str) -> bool:
    """Whether ``path`` names a pickle-based file (``.bin``, ``.pt``, ``.pkl``...)."""
    return path.lower().endswith(PICKLE_SUFFIXES)


def check_not_pickle(path: str, source: str = "the Hub") -> None:
    """Raise :class:`UnsafeFileError` if ``path`` is a pickle-based file."""
    if is_pickle_name(path):
        raise UnsafeFileError(
            f"Refusing {path!r} from {source}: it is a pickle-based file ({', '.join(PICKLE_SUFFIXES)}), "
            f"and loading a pickle can run arbitrary code. moa loads safetensors only. Ask the "
            f"publisher to re-save it with save_pretrained(safe_serialization=True)."
        )


def check_listing(files: Iterable[RemoteFile], limits: Limits, source: str) -> list[RemoteFile]:
    """Check every listed name, the file count and the sizes; return the files as a list."""
    listed = list(files)
    if len(listed) > limits.max_files:
        raise UnsafeFileError(
            f"{source} lists {len(listed)} files, above the cap of {limits.max_files}. Nothing was downloaded."
        )
    total = 0
    for remote in listed:
        check_file_name(remote.path, source)
        size = remote.size or 0
        if size > limits.max_file_bytes:
            raise UnsafeFileError(
                f"{remote.path!r} in {source} is {size} bytes, above the cap of {limits.max_file_bytes} "
                f"bytes. Nothing was downloaded. Raise the cap with {MAX_FILE_BYTES_ENV}=N if you trust it."
            )
        total += size
    if total > limits.max_total_bytes:
        raise UnsafeFileError(
            f"{source} holds {total} bytes, above the cap of {limits.max_total_bytes} bytes. Nothing was "
            f"downloaded. Raise the cap with {MAX_TOTAL_BYTES_ENV}=N if you trust it."
        )
    return listed


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1_file(path: str | os.PathLike) -> str:
    """Git's blob id of a file (what the Hub lists as ``oid`` for non-LFS files)."""
    digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))  # noqa: S324 - git's object id
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_against_listing(local: Path, remote: RemoteFile, source: str) -> str:
    """Check a downloaded file against the hash the Hub listed for it; return its sha256.

    Raises:
        IntegrityError: size, sha256 (LFS files) or git blob id (other files) differs.
    """
    actual_sha256 = sha256_file(local)
    size = local.stat().st_size
    problem = None
    if remote.size is not None and size != remote.size:
        problem = f"size {size} bytes, listed {remote.size}"
    elif remote.lfs_sha256 and actual_sha256 != remote.lfs_sha256:
        problem = f"sha256 {actual_sha256}, listed {remote.lfs_sha256}"
    elif not remote.lfs_sha256 and remote.blob_id and git_blob_sha1_file(local) != remote.blob_id:
        problem = f"git blob id {git_blob_sha1_file(local)}, listed {remote.blob_id}"
    if problem:
        raise IntegrityError(
            f"{remote.path!r} from {source} does not match the Hub's listing ({problem}): the download is "
            f"corrupt or the file was tampered with. Nothing was loaded; the bad copy was removed from the "
            f"cache. Pull again, and report the repo if it persists."
        )
    return actual_sha256


def verify_digests(folder: Path, expected: Mapping[str, str], source: str) -> dict[str, str]:
    """Check that every pinned file of ``folder`` has its pinned sha256; return the actual digests.

    Raises:
        IntegrityError: naming every file that is missing or differs (expected vs actual).
    """
    actual: dict[str, str] = {}
    problems = []
    for name, want in sorted(expected.items()):
        path = folder / check_file_name(name, source)
        if not path.is_file():
            problems.append(f"{name!r} is missing")
            continue
        actual[name] = sha256_file(path)
        if actual[name] != want:
            problems.append(f"{name!r} has sha256 {actual[name]}, pinned {want}")
    if problems:
        raise IntegrityError(
            f"Files of {source} do not match their pinned sha256: {'; '.join(problems)}. Nothing was "
            f"loaded. The repo changed under its pinned commit or the download is corrupt: pull again, "
            f"or ask the publisher to push the mixture again."
        )
    return actual


def verify_folder_exact(folder: Path, expected: Mapping[str, str], source: str, next_step: str) -> dict[str, str]:
    """Check that ``folder`` holds exactly the pinned files (recursively), each with its pinned sha256.

    Used for adapters shipped inside the moa package, where the whole folder is pinned, so
    an unpinned extra file fails as well (``__pycache__`` folders are ignored).

    Args:
        folder: The folder to check.
        expected: File name (POSIX path relative to ``folder``) -> sha256.
        source: What the folder is, for messages.
        next_step: What to do when it does not match, appended to the message.

    Returns:
        File name -> sha256 of every file.

    Raises:
        IntegrityError: naming every missing, unpinned or changed file with its expected and actual sha256.
    """
    present = sorted(
        path.relative_to(folder).as_posix() for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.relative_to(folder).parts
    )
    actual = {name: sha256_file(folder / name) for name in present}
    problems = [f"{name!r} is missing (pinned sha256 {want})" for name, want in sorted(expected.items())
                if name not in actual]
    problems += [f"{name!r} has sha256 {digest}, pinned {expected[name]}" for name, digest in actual.items()
                 if name in expected and digest != expected[name]]
    problems += [f"{name!r} is not pinned (sha256 {digest})" for name, digest in actual.items() if name not in expected]
    if problems:
        raise IntegrityError(
            f"Files of {source} ({folder}) do not match their pinned sha256s: {'; '.join(problems)}. Nothing was "
            f"loaded. {next_step}"
        )
    return actual


def check_sha256_hex(value: Any, what: str) -> str:
    """Return ``value`` if it is a lowercase 64-hex sha256, else raise :class:`IntegrityError`."""
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise IntegrityError(f"{what} must be a 64-character lowercase hex sha256, got {value!r}.")
    return value


def check_adapter_config_ranks(config: Mapping[str, Any], max_rank: int, source: str) -> None:
    """Check ``r`` and every ``rank_pattern`` value of an adapter config against ``max_rank``.

    Raises:
        AdapterShapeError: a rank above the cap (or not a positive integer).
    """
    check_config_ranks(config, max_rank, f"{source}: adapter_config.json")


def check_safetensors_header(path: Path, max_rank: int | None, source: str) -> dict[str, Any]:
    """Parse a safetensors header without loading tensors; check offsets, and LoRA ranks if asked.

    Returns:
        The header (tensor name -> ``{"dtype", "shape", "data_offsets"}``, plus ``__metadata__``).

    Raises:
        AdapterFormatError: not a safetensors file, or offsets outside the file.
        AdapterShapeError: a ``lora_A`` / ``lora_B`` tensor whose rank is above ``max_rank``.
    """
    try:
        header = check_header(path)
    except AdapterFormatError as error:
        raise AdapterFormatError(
            f"{path.name!r} from {source} is not a valid safetensors file ({error}). Nothing was loaded."
        ) from error
    if max_rank is not None:
        for name, info in header.items():
            shape = info.get("shape", []) if isinstance(info, dict) else []
            rank = shape[0] if ".lora_A." in name and shape else shape[1] if ".lora_B." in name and len(shape) > 1 else None
            if rank is not None and rank > max_rank:
                raise AdapterShapeError(
                    f"{source}: tensor {name!r} has rank {rank}, above the rank cap {max_rank}. Nothing was "
                    f"loaded. Pass a higher max_rank if you trust this adapter."
                )
    return header


__all__ = [
    "PICKLE_SUFFIXES",
    "Limits",
    "RemoteFile",
    "check_adapter_config_ranks",
    "check_against_listing",
    "check_file_name",
    "check_listing",
    "check_not_pickle",
    "check_safetensors_header",
    "check_sha256_hex",
    "git_blob_sha1_file",
    "is_pickle_name",
    "sha256_file",
    "verify_digests",
    "verify_folder_exact",
]
