"""Downloading repo files into the Hugging Face cache: bounded retries, and a cache that keeps no bad file.

:func:`download_files` fetches files with ``hf_hub_download`` at one commit. What is worth
retrying is retried here (:func:`is_transient`: HTTP 408/429/5xx, connection resets,
refused connections, timeouts), a few times with a growing wait (:func:`retrying`):
``MOA_HUB_RETRIES`` attempts (default :data:`RETRY_ATTEMPTS`), waiting ``MOA_HUB_RETRY_WAIT_S``
seconds (default :data:`RETRY_WAIT_S`) before the first retry, doubled before each next one, at
most :data:`RETRY_MAX_WAIT_S`. When every attempt fails, :func:`retrying` raises a
:class:`~moa.errors.HubError` saying what was asked, what failed, how many attempts over how long,
and the next step.

A Hub that fails every time is given up on within a documented bound (:func:`give_up_bound_s`):
``attempts x 2 x timeout + the waits`` for the listing (``model_info``) or a file's ``HEAD``, where
``timeout`` is huggingface_hub's ``HF_HUB_DOWNLOAD_TIMEOUT`` (listing, ``GET``) or
``HF_HUB_ETAG_TIMEOUT`` (``HEAD``), 10 s each by default, and ``2 x`` covers a connect and an
answer that each run up to it: 61.5 s with the defaults; a Hub that answers an error status or
refuses the connection, about the waits alone (1.5 s). huggingface_hub's own backoff on a failed
``HEAD`` (1 + 2 + 4 + 8 + 8 s, 60 s timeouts, not configurable through its public API) is never
entered: a file missing from the cache is fetched with ``force_download=True``, with which
huggingface_hub raises on the first failed ``HEAD``, and a file at the same commit already in the
cache is used without asking the Hub (:func:`download_files`).

The cache never keeps a bad file: huggingface_hub writes each download to a temporary
``*.incomplete`` file and renames it only when complete; :func:`check_cache_name` refuses a
file cached under a hash (the download's ETag) other than the one the listing gives, and
:func:`evict` removes a cached file that fails a check, its blob with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from moa import compat
from moa.errors import HubError, IntegrityError, MoaError
from moa.hub.verify import RemoteFile

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How many times a Hub call is tried when it fails for a transient reason (``MOA_HUB_RETRIES``).
RETRY_ATTEMPTS = 3
#: Wait before the first retry, in seconds (``MOA_HUB_RETRY_WAIT_S``); doubled before each next one.
RETRY_WAIT_S = 0.5
#: The longest wait between two attempts, in seconds (and the largest ``MOA_HUB_RETRY_WAIT_S``).
RETRY_MAX_WAIT_S = 8.0
#: HTTP statuses that mean "try again later".
TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)
_HEX_DIGITS = frozenset("0123456789abcdef")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def retry_attempts() -> int:
    """Attempts per Hub call: ``MOA_HUB_RETRIES`` when it is a positive integer, else :data:`RETRY_ATTEMPTS`."""
    value = os.environ.get("MOA_HUB_RETRIES", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return RETRY_ATTEMPTS


def retry_waits() -> list[float]:
    """The waits between the attempts of one Hub call, in seconds (one fewer than :func:`retry_attempts`).

    The first is ``MOA_HUB_RETRY_WAIT_S`` when that is a number from 0 to :data:`RETRY_MAX_WAIT_S`
    (else :data:`RETRY_WAIT_S`); each next one doubles, up to :data:`RETRY_MAX_WAIT_S`.
    """
    raw = os.environ.get("MOA_HUB_RETRY_WAIT_S", "").strip()
    first = RETRY_WAIT_S
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and 0 <= value <= RETRY_MAX_WAIT_S:
            first = value
        else:
            logger.warning("MOA_HUB_RETRY_WAIT_S=%r is not a number of seconds from 0 to %g; using %g.",
                           raw, RETRY_MAX_WAIT_S, RETRY_WAIT_S)
    return [min(RETRY_MAX_WAIT_S, first * 2**k) for k in range(retry_attempts() - 1)]


def give_up_bound_s(timeout_s: float | None = None) -> float:
    """The longest a Hub call that fails every time runs before :func:`retrying` gives up, in seconds.

    ``attempts x 2 x timeout + sum(waits)`` (:func:`retry_attempts`, :func:`retry_waits`): each
    attempt sends one request (the listing's ``GET``, or a file's ``HEAD``), whose connect and
    answer may each take up to the client's timeout before it fails. With the defaults (3 attempts,
    10 s timeouts, waits 0.5 + 1 s) that is 61.5 s; a Hub that answers an error status or refuses
    the connection is given up on after about the waits alone.

    Args:
        timeout_s: The client's timeout per request; default the larger of huggingface_hub's
            ``HF_HUB_ETAG_TIMEOUT`` (``HEAD``) and ``HF_HUB_DOWNLOAD_TIMEOUT`` (listing, ``GET``).
    """
    if timeout_s is None:
        from huggingface_hub import constants

        timeout_s = max(float(constants.HF_HUB_ETAG_TIMEOUT), float(constants.HF_HUB_DOWNLOAD_TIMEOUT))
    return retry_attempts() * 2 * timeout_s + sum(retry_waits())


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


def describe_failure(error: BaseException) -> str:
    """What failed, in one line: the request and its status or connection error.

    E.g. ``"HEAD http://host/alice/x/resolve/<commit>/adapter_config.json answered HTTP 503
    Service Unavailable"`` or ``"GET http://host/api/models/alice/x failed: ConnectError: [Errno 111]
    Connection refused"``.
    """
    from huggingface_hub.errors import HfHubHTTPError

    transport_errors = compat.hub_transport_errors()
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, HfHubHTTPError) and getattr(current, "response", None) is not None:
            response = current.response
            return (f"{_request_line(current) or 'the Hub'} answered HTTP {response.status_code} "
                    f"{getattr(response, 'reason_phrase', '') or ''}".rstrip())
        if isinstance(current, transport_errors):
            request = _request_line(current)
            return f"{request + ' failed: ' if request else ''}{type(current).__name__}: {current}"
        current = current.__cause__ or current.__context__
    return f"{type(error).__name__}: {error}"


def _request_line(error: BaseException) -> str:
    """``"METHOD url"`` of the request an HTTP client error carries, or ``""``."""
    request = None
    for holder in (error, getattr(error, "response", None)):
        try:
            request = request or getattr(holder, "request", None)  # httpx raises RuntimeError when it has none
        except RuntimeError:
            continue
    method, url = getattr(request, "method", None), getattr(request, "url", None)
    return f"{method} {url}" if method and url else ""


def retrying(call: Callable[[], T], what: str) -> T:
    """``call()``, tried again after a transient failure (:func:`is_transient`), a bounded number of times.

    Each call is tried :func:`retry_attempts` times at most, waiting :func:`retry_waits` between
    the attempts; a call that fails every time takes at most :func:`give_up_bound_s` (documented in
    ``docs/reliability.md``).

    Args:
        call: What to do (e.g. one ``hf_hub_download``).
        what: What it does, for the log and the error (``"download 'x' of 'alice/y' at commit abc..."``).

    Raises:
        HubError: every attempt failed for a transient reason; the message says what was asked, the
            last failure, the attempts and the time taken, and the next step.
        Exception: the first failure that is not transient, as ``call`` raised it.
    """
    attempts, waits = retry_attempts(), retry_waits()
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except MoaError:
            raise
        except Exception as error:
            if not is_transient(error):
                raise
            if attempt >= attempts:
                raise gave_up(what, error, attempts, time.monotonic() - start) from error
            wait = waits[attempt - 1]
            logger.warning("Could not %s (%s); retrying in %.1f s (attempt %d of %d).",
                           what, describe_failure(error), wait, attempt + 1, attempts)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def gave_up(what: str, error: BaseException, attempts: int, elapsed_s: float) -> HubError:
    """The error of a Hub call that failed on every attempt: what was asked, what failed, attempts, next step."""
    from huggingface_hub import constants

    return HubError(
        f"Could not {what}: {describe_failure(error)} (tried {attempts} times over {elapsed_s:.1f} s). No "
        f"partial file was kept. Check your network and HF_ENDPOINT (now {constants.ENDPOINT}), then retry "
        f"later; to keep trying longer, raise MOA_HUB_RETRIES (attempts, now {attempts}) or MOA_HUB_RETRY_WAIT_S "
        f"(first wait in seconds, doubled each time)."
    )


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

    At a commit (what every online pull asks for), a file already in the cache is used without
    asking the Hub, and a missing one is fetched with ``force_download=True``: huggingface_hub
    then raises on the first failed ``HEAD`` instead of retrying it with its own backoff (about
    23 s per file), so :func:`retrying` alone decides how long a failing Hub is tried
    (:func:`give_up_bound_s`). Offline, files missing from the cache are skipped. Errors of
    huggingface_hub are left for the caller to word (see :func:`moa.hub.pull.hub_errors`), except a
    download whose size differs from the announced one.

    Raises:
        HubError: every attempt failed for a transient reason (:func:`retrying`).
        IntegrityError: the Hub announced one size and sent another (nothing was cached).
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub import errors as hf_errors

    at_commit = revision is not None and _COMMIT.fullmatch(revision) is not None
    local: dict[str, Path] = {}
    for name in names:
        def fetch(name: str = name, force: bool = False) -> str:
            try:
                return hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, token=token,
                                       local_files_only=offline, force_download=force,
                                       etag_timeout=constants.HF_HUB_ETAG_TIMEOUT)
            except ValueError as error:  # "Force download failed ...": raised from the HEAD's own error
                if force and isinstance(error.__cause__, Exception):
                    raise error.__cause__ from None
                raise
        what = f"download {name!r} of {repo_id!r} at {'commit' if at_commit else 'revision'} {revision or 'main'}"
        try:
            if offline:
                path = fetch()
            else:
                path = (_cached(repo_id, name, revision, cache_dir) if at_commit else None) or retrying(
                    lambda name=name: fetch(name, force=at_commit), what)
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


def _cached(repo_id: str, name: str, commit: str | None, cache_dir: Any) -> str | None:
    """The HF cache's copy of ``name`` at ``commit``, or ``None`` (nothing is asked of the Hub)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    try:
        return str(hf_hub_download(repo_id, name, revision=commit, cache_dir=cache_dir, local_files_only=True))
    except (hf_errors.LocalEntryNotFoundError, hf_errors.EntryNotFoundError):
        return None


__all__ = [
    "RETRY_ATTEMPTS",
    "RETRY_MAX_WAIT_S",
    "RETRY_WAIT_S",
    "TRANSIENT_STATUSES",
    "blob_hash",
    "cached_expectation",
    "check_cache_name",
    "describe_failure",
    "download_files",
    "evict",
    "gave_up",
    "give_up_bound_s",
    "is_transient",
    "retry_attempts",
    "retry_waits",
    "retrying",
]
