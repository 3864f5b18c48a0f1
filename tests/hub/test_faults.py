"""Faults over HTTP: what pulls and pushes do when the Hub (test server) errs, resets, stalls or lies.

Each test plans faults on the Hub test server (``hub.storage.add_fault``, see
:data:`tests.hub.storage.FAULT_KINDS`), then checks the guarantees:

* pull: a transient fault (5xx, reset, cut body, one hang) is retried and the pull succeeds;
  a lasting fault or a lie (wrong size or hash) raises a :class:`~moa.errors.MoaError`
  naming the file and the next step; the caches never keep a bad or partial file; once the
  fault is gone a pull succeeds;
* push: a push broken off (commit or LFS upload) leaves the remote branch at its previous
  commit (or, when the Hub applied the commit before the connection broke, at the complete
  new one) and the local folder byte-for-byte as it was; pushing again works.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from pathlib import Path

import pytest

from moa.errors import HubError, IntegrityError
from moa.hub import pull_adapter
from moa.hub.push import push_adapter_folder
from moa.hub.verify import git_blob_sha1_file, sha256_file

pytestmark = pytest.mark.timeout(60)

REPO = "alice/faulty"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
RESOLVE = rf"^/{REPO}/resolve/[^/]+/"  # + the file name
LISTING = rf"^/api/models/{REPO}(/revision/[^/]+)?$"
COMMIT = rf"^/api/models/{REPO}/commit/"


@pytest.fixture
def fast_client(monkeypatch):
    """Short client timeouts and short huggingface_hub / moa retry waits, so every fault costs seconds."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    import moa.hub.download as download

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    monkeypatch.setattr(download, "RETRY_WAIT_S", 0.05)
    monkeypatch.delenv("MOA_HUB_RETRIES", raising=False)
    for wrapped in (_http.http_backoff, _http.http_stream_backoff, _http._http_backoff_base):
        function = inspect.unwrap(wrapped)  # http_stream_backoff is a contextmanager
        monkeypatch.setattr(function, "__kwdefaults__",
                            {**function.__kwdefaults__, "base_wait_time": 0.05, "max_wait_time": 0.1})


@pytest.fixture
def published(hub, adapter_folder, fast_client, tmp_path, monkeypatch):
    """``alice/faulty`` on the Hub, an empty HF cache and an empty MOA_HOME; yields the pushed digests."""
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "moa-home"))
    return push_adapter_folder(adapter_folder, REPO, model_card=False).files


def assert_caches_clean(hub, moa_home: Path) -> None:
    """No partial download anywhere; every cached blob is named after its content's hash; links resolve."""
    cache = hub.cache_dir
    partial = [p for p in cache.rglob("*") if ".incomplete" in p.name] if cache.exists() else []
    assert partial == [], f"partial downloads left in the HF cache: {partial}"
    for blob in cache.glob("models--*/blobs/*"):
        actual = sha256_file(blob) if len(blob.name) == 64 else git_blob_sha1_file(blob)
        assert actual == blob.name, f"the HF cache keeps {blob} whose content hashes to {actual}"
    for link in cache.glob("models--*/snapshots/*/**/*"):
        assert not link.is_symlink() or link.resolve().is_file(), f"dangling cache link {link}"
    assert not moa_home.exists() or not any(moa_home.rglob("*")), f"a pull wrote into MOA_HOME: {moa_home}"


def pull_ok(hub, published, tmp_path) -> Path:
    folder = pull_adapter(REPO, cache_dir=hub.cache_dir)
    assert {n: sha256_file(folder / n) for n in published} == published
    assert_caches_clean(hub, tmp_path / "moa-home")
    return folder


# -- pull: transient faults are retried ---------------------------------------------------------------


@pytest.mark.parametrize(("kind", "method", "path", "times", "options"), [
    pytest.param("status", "GET", LISTING, 2, {"status": 500}, id="listing-500-twice"),
    pytest.param("reset", "GET", LISTING, 1, {}, id="listing-reset"),
    pytest.param("hang", "GET", LISTING, 1, {"seconds": 20}, id="listing-hang"),
    pytest.param("status", "GET", RESOLVE + WEIGHTS, 1, {"status": 503}, id="download-503"),
    pytest.param("status", "HEAD", RESOLVE + WEIGHTS, 1, {"status": 500}, id="head-500"),
    pytest.param("reset", "GET", RESOLVE + CONFIG, 1, {}, id="download-reset"),
    pytest.param("reset-body", "GET", RESOLVE + WEIGHTS, 1, {}, id="reset-mid-body"),
    pytest.param("short-body", "GET", RESOLVE + WEIGHTS, 1, {}, id="body-shorter-than-content-length"),
    pytest.param("hang", "GET", RESOLVE + WEIGHTS, 1, {"seconds": 20}, id="download-hang"),
])
def test_transient_fault_is_retried_and_the_pull_succeeds(hub, published, tmp_path, kind, method, path, times,
                                                          options):
    fault = hub.storage.add_fault(kind, method=method, path=path, times=times, **options)
    start = time.monotonic()
    pull_ok(hub, published, tmp_path)
    assert fault.hits == times, f"the {kind} fault was never injected"
    assert time.monotonic() - start < 15


# -- pull: lasting faults and lies fail clearly and leave nothing bad behind ------------------------


@pytest.mark.parametrize(("kind", "method", "path", "options", "error", "words"), [
    pytest.param("status", "GET", RESOLVE + WEIGHTS, {"status": 503}, HubError, "tried 3 times",
                 id="download-503-always"),
    pytest.param("hang", "GET", LISTING, {"seconds": 30}, HubError, "tried 3 times", id="listing-hang-always"),
    pytest.param("status", "GET", LISTING, {"status": 500}, HubError, "tried 3 times", id="listing-500-always"),
    pytest.param("wrong-size", "HEAD", RESOLVE + WEIGHTS, {}, IntegrityError, "announced one size",
                 id="wrong-x-linked-size"),
    pytest.param("wrong-size", "HEAD", RESOLVE + CONFIG, {}, IntegrityError, "announced one size",
                 id="wrong-content-length"),
    pytest.param("wrong-etag", "HEAD", RESOLVE + WEIGHTS, {}, IntegrityError, "ETag", id="wrong-x-linked-etag"),
    pytest.param("wrong-etag", "HEAD", RESOLVE + CONFIG, {}, IntegrityError, "ETag", id="wrong-etag"),
    pytest.param("wrong-listing-hash", "GET", LISTING, {"file": WEIGHTS}, IntegrityError, "sha256",
                 id="wrong-sha256-in-listing"),
    pytest.param("wrong-listing-hash", "GET", LISTING, {"file": CONFIG}, IntegrityError, "git blob id",
                 id="wrong-blob-id-in-listing"),
    pytest.param("wrong-listing-size", "GET", LISTING, {"file": WEIGHTS}, IntegrityError, "size",
                 id="wrong-size-in-listing"),
])
def test_lasting_fault_raises_a_clear_error_and_caches_stay_clean(hub, published, tmp_path, kind, method, path,
                                                                  options, error, words):
    fault = hub.storage.add_fault(kind, method=method, path=path, times=100, **options)
    start = time.monotonic()
    with pytest.raises(error) as raised:
        pull_adapter(REPO, cache_dir=hub.cache_dir)
    assert time.monotonic() - start < 20
    assert fault.hits >= 1
    message = str(raised.value)
    assert REPO in message and words in message, message
    assert any(step in message for step in ("Pull again", "retry")), message  # a next step
    if error is IntegrityError:
        assert "adapter_" in message  # names the file
    assert_caches_clean(hub, tmp_path / "moa-home")
    hub.storage.clear_faults()
    pull_ok(hub, published, tmp_path)  # the fault is gone: a later pull succeeds


def test_fault_after_a_good_file_keeps_the_good_file_and_the_next_pull_completes(hub, published, tmp_path):
    hub.storage.add_fault("status", method="GET", path=RESOLVE + WEIGHTS, times=100, status=503)
    with pytest.raises(HubError):
        pull_adapter(REPO, cache_dir=hub.cache_dir)
    assert_caches_clean(hub, tmp_path / "moa-home")
    hub.storage.clear_faults()
    pull_ok(hub, published, tmp_path)


# -- push: an interrupted push changes nothing (or commits everything) ------------------------------


def folder_digest(folder: Path) -> str:
    """One hash over every file's relative name and bytes (and nothing else in the folder)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def other_adapter(adapter_folder: Path, tmp_path: Path) -> Path:
    """A copy of ``adapter_folder`` with other weights (so a push makes a new commit)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "v2"
    folder.mkdir()
    for path in adapter_folder.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tensors = {k: v + 1 for k, v in load_file(adapter_folder / WEIGHTS).items()}
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(("kind", "method", "path", "options"), [
    pytest.param("status", "POST", COMMIT, {"status": 500}, id="commit-500"),
    pytest.param("reset", "POST", COMMIT, {}, id="commit-reset"),
    pytest.param("status", "POST", r"\.git/info/lfs/objects/batch$", {"status": 403}, id="lfs-batch-403"),
    pytest.param("reset", "PUT", r"^/_lfs/upload/", {}, id="lfs-upload-reset"),
    pytest.param("status", "PUT", r"^/_lfs/upload/", {"status": 503}, id="lfs-upload-503"),
    pytest.param("status", "POST", r"^/_lfs/verify$", {"status": 502}, id="lfs-verify-502"),
])
def test_interrupted_push_leaves_the_remote_and_the_folder_as_they_were(hub, published, adapter_folder, tmp_path,
                                                                        kind, method, path, options):
    folder = other_adapter(adapter_folder, tmp_path)
    before_local, before_remote = folder_digest(folder), hub.storage.repo(REPO).branches["main"]
    fault = hub.storage.add_fault(kind, method=method, path=path, times=100, **options)
    with pytest.raises(HubError) as raised:
        push_adapter_folder(folder, REPO, model_card=False)
    assert fault.hits >= 1
    assert "pushing again is safe" in str(raised.value) and REPO in str(raised.value)
    assert hub.storage.repo(REPO).branches["main"] == before_remote
    assert folder_digest(folder) == before_local
    assert pull_ok(hub, published, tmp_path)  # the remote still serves the previous version, whole
    hub.storage.clear_faults()
    result = push_adapter_folder(folder, REPO, model_card=False)
    assert result.oid != before_remote and folder_digest(folder) == before_local


def test_push_whose_answer_is_lost_after_the_commit_is_complete_and_pushing_again_is_a_no_op(
        hub, published, adapter_folder, tmp_path):
    folder = other_adapter(adapter_folder, tmp_path)
    before_local, before_remote = folder_digest(folder), hub.storage.repo(REPO).branches["main"]
    hub.storage.add_fault("reset-after", method="POST", path=COMMIT, times=1)
    with pytest.raises(HubError, match="pushing again is safe"):
        push_adapter_folder(folder, REPO, model_card=False)
    after = hub.storage.repo(REPO).branches["main"]
    assert after != before_remote  # the Hub applied it: the branch holds the complete new version
    assert set(hub.storage.resolve(REPO, after).files) >= {CONFIG, WEIGHTS}
    assert folder_digest(folder) == before_local
    again = push_adapter_folder(folder, REPO, model_card=False)
    assert again.oid == after and hub.count("POST", "/commit/") == 2  # published, the lost one; no-op: none
    pulled = pull_adapter(REPO, cache_dir=hub.cache_dir)
    assert sha256_file(pulled / WEIGHTS) == sha256_file(folder / WEIGHTS)


def test_transient_lfs_upload_fault_is_retried_by_the_client(hub, published, adapter_folder, tmp_path):
    folder = other_adapter(adapter_folder, tmp_path)
    fault = hub.storage.add_fault("status", method="PUT", path=r"^/_lfs/upload/", times=1, status=503)
    result = push_adapter_folder(folder, REPO, model_card=False)
    assert fault.hits == 1 and hub.storage.repo(REPO).branches["main"] == result.oid
