"""Downloading repo files into the Hugging Face cache: retries, and a cache that keeps no bad file.

:func:`download_files` fetches files with ``hf_hub_download`` at one commit. What is worth
retrying is retried here (:func:`is_transient`: HTTP 408/429/5xx, connection resets,
refused connections, timeouts), a few times with a growing wait
(:data:`RETRY_ATTEMPTS`, :data:`RETRY_WAIT_S`; ``MOA_HUB_RETRIES`` sets the attempts).
huggingface_hub itself resumes a body cut short and retries a failed ``HEAD``; a ``GET``
answered 5xx or a reset connection it gives up on, and a pull would fail on one blip.

The cache never keeps a bad file: huggingface_hub writes each download to a temporary
``*.incomplete`` file and renames it only when complete; :func:`check_cache_name` refuses a
file cached under a hash (the download's ETag) other than the one the listing gives, and
:func:`evict` removes a cached file that fails a check, its blob with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from moa import compat
from moa.errors import IntegrityError
from moa.hub.verify import RemoteFile

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How many times a Hub call is tried when it fails for a transient reason (``MOA_HUB_RETRIES``).
RETRY_ATTEMPTS = 3
#: Wait before the first retry, in seconds; doubled before each next one.
RETRY_WAIT_S = 0.5
#: HTTP statuses that mean "try again later".
TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)
_HEX_DIGITS = frozenset("0123456789abcdef")


def retry_attempts() -> int:
    """Attempts per Hub call: ``MOA_HUB_RETRIES`` when it is a positive integer, else :data:`RETRY_ATTEMPTS`."""
    value = os.environ.get("MOA_HUB_RETRIES", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return RETRY_ATTEMPTS


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a failure that a retry may not meet again.

    Transient: an HTTP 408, 429 or 5xx answer; a connection refused, reset or closed before
    the answer was complete; a timeout. Not transient: any other answer (404, 401, ...) and
    anything moa raised itself, and huggingface_hub's ``LocalEntryNotFoundError`` (it gave up on
    its ``HEAD`` only after its own retries).
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    transport_errors = compat.hub_transport_errors()

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LocalEntryNotFoundError):  # huggingface_hub retried its HEAD already
            return False
        if isinstance(current, HfHubHTTPError):
            response = getattr(current, "response", None)
            return getattr(response, "status_code", None) in TRANSIENT_STATUSES
        if isinstance(current, transport_errors):
            return True
        current = current.__cause__ or current.__context__
    return False


def retrying(call: Callable[[], T], what: str) -> T:
    """``call()``, tried again after a transient failure (:func:`is_transient`); the last error is raised.

    Args:
        call: What to do (e.g. one ``hf_hub_download``).
        what: What it does, for the log (``"download 'x' of alice/y"``).
    """
    attempts = retry_attempts()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt >= attempts or not is_transient(error):
                raise
            wait = RETRY_WAIT_S * 2 ** (attempt - 1)
            logger.warning("Could not %s (%s: %s); retrying in %.1f s (attempt %d of %d).",
                           what, type(error).__name__, error, wait, attempt + 1, attempts)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def evict(path: Path) -> None:
    """Remove a cached file and, for an HF cache symlink, the blob it points to."""
    with contextlib.suppress(OSError):
        if path.is_symlink():
            blob = path.resolve()
            path.unlink()
            blob.unlink()
        else:
            path.unlink()


def blob_hash(path: Path) -> str | None:
    """The hash an HF cache file is stored under (its blob's name), or ``None`` if it is no cache symlink."""
    if not path.is_symlink():
        return None
    key = path.resolve().name
    if len(key) not in (40, 64) or not set(key) <= _HEX_DIGITS:
        return None
    return key


def cached_expectation(path: Path, name: str) -> RemoteFile | None:
    """What the HF cache's content-addressed blob name says a cached file must hash to."""
    key = blob_hash(path)
    if key is None:
        return None
    return RemoteFile(name, None, None if len(key) == 64 else key, key if len(key) == 64 else None)


def check_cache_name(path: Path, listed: RemoteFile, source: str) -> None:
    """Refuse a download cached under another hash than the listing's (the Hub sent a wrong ETag).

    The HF cache names each blob after the ETag of its download; a blob whose name is not the
    file's listed hash would be trusted later (offline pulls check files against that name).

    Raises:
        IntegrityError: the blob name differs from the listed sha256 (LFS) or git blob id; the
            cached copy has been removed.
    """
    key = blob_hash(path)
    expected = listed.lfs_sha256 or listed.blob_id
    if key is None or expected is None or key == expected:
        return
    evict(path)
    raise IntegrityError(
        f"{listed.path!r} from {source} was served with ETag {key}, but the Hub's listing gives its hash as "
        f"{expected}: the Hub (or a proxy between) answers inconsistently. Nothing was loaded; the cached copy "
        f"was removed. Pull again later; if it persists, check HF_ENDPOINT and any proxy, or report the repo."
    )


def download_files(
    repo_id: str, revision: str | None, names: Sequence[str], cache_dir: Any, token: str | None, offline: bool,
    source: str,
) -> dict[str, Path]:
    """Download (or find in the cache) each file, retrying transient failures; name -> local path.

    Offline, files missing from the cache are skipped. Errors of huggingface_hub are left for
    the caller to word (see :func:`moa.hub.pull.hub_errors`), except a download whose size
    differs from the announced one.

    Raises:
        IntegrityError: the Hub announced one size and sent another (nothing was cached).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    local: dict[str, Path] = {}
    for name in names:
        def fetch(name: str = name) -> str:
            return hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                   local_files_only=offline)
        try:
            path = fetch() if offline else retrying(fetch, f"download {name!r} of {repo_id}")
        except (hf_errors.LocalEntryNotFoundError, hf_errors.EntryNotFoundError):
            if not offline:
                raise
            continue
        except OSError as error:
            if "Consistency check failed" not in str(error):
                raise
            raise IntegrityError(
                f"{name!r} from {source}: the Hub announced one size and sent another ({error}). Nothing was "
                f"loaded or cached. Pull again; if it persists, the Hub (or a proxy between) serves a "
                f"corrupt file: check HF_ENDPOINT and any proxy, or report the repo."
            ) from error
        local[name] = Path(path)
    return local


__all__ = [
    "RETRY_ATTEMPTS",
    "RETRY_WAIT_S",
    "TRANSIENT_STATUSES",
    "blob_hash",
    "cached_expectation",
    "check_cache_name",
    "download_files",
    "evict",
    "is_transient",
    "retry_attempts",
    "retrying",
]
