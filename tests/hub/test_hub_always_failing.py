"""A Hub that fails every time: a pull gives up within its documented bound, with a clear HubError.

The Hub test server is made to fail every request of one kind (``storage.add_fault(...,
times=FOREVER)``): the HEAD of every file answers 503 or never answers, or the listing
(``model_info``) answers 503, or nothing listens where the files or the whole Hub are
(connection refused). Each pull must raise :class:`~moa.errors.HubError` saying what was asked,
what failed, how many attempts over how long and the next step, within the bound
``docs/reliability.md`` gives (:func:`moa.hub.download.give_up_bound_s`), and leave nothing in the
HF cache or the output folder.
The retry knobs are set low (``MOA_HUB_RETRIES``, ``MOA_HUB_RETRY_WAIT_S``, the client timeouts),
so each case takes at most a few seconds when the bound holds (huggingface_hub's own backoff used to
take ~23 s per file HEAD).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from moa.errors import HubError
from moa.hub import pull_adapter
from moa.hub.push import push_adapter_folder

pytestmark = pytest.mark.timeout(120)

REPO = "alice/always-failing"
RESOLVE = rf"^/{REPO}/resolve/"
LISTING = rf"^/api/models/{REPO}(/revision/[^/]+)?$"
FIRST_FILE = "adapter_config.json"  # the first file a pull fetches (moa.hub.pull.ADAPTER_FILES)
FOREVER = 10**9
#: The knobs each test sets: attempts (MOA_HUB_RETRIES), first wait (MOA_HUB_RETRY_WAIT_S), client timeouts.
ATTEMPTS, WAIT_S, TIMEOUT_S = 2, 0.1, 2
#: The bound docs/reliability.md documents, for these knobs: attempts x (connect + answer timeout) + the waits.
BOUND_S = ATTEMPTS * 2 * TIMEOUT_S + WAIT_S


@pytest.fixture
def knobs(monkeypatch) -> None:
    """Low retry knobs and client timeouts (huggingface_hub reads HF_HUB_*_TIMEOUT at import: set its constants)."""
    from huggingface_hub import constants

    monkeypatch.setenv("MOA_HUB_RETRIES", str(ATTEMPTS))
    monkeypatch.setenv("MOA_HUB_RETRY_WAIT_S", str(WAIT_S))
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", TIMEOUT_S)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", TIMEOUT_S)


@pytest.fixture
def published(hub, adapter_folder, tmp_path, monkeypatch) -> dict[str, str]:
    """REPO on the Hub test server, an empty HF cache and an empty MOA_HOME; the pushed sha256s.

    Pushed with a fresh client and moa's default retries, before a test lowers them (``knobs``):
    earlier tests' faults can leave connections in huggingface_hub's shared pool that the server
    has dropped, and this set-up is not what these tests measure.
    """
    from huggingface_hub import close_session

    close_session()
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "moa-home"))
    return push_adapter_folder(adapter_folder, REPO, model_card=False).files


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local port that refuses connections: bound (so nobody else takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def fail_forever(hub, monkeypatch, port: int, case: str) -> None:
    """Make the Hub fail every request of ``case``."""
    from huggingface_hub import constants

    dead = f"http://127.0.0.1:{port}"
    if case == "head-503":
        hub.storage.add_fault("status", method="HEAD", path=RESOLVE, times=FOREVER, status=503)
    elif case == "listing-503":
        hub.storage.add_fault("status", method="GET", path=LISTING, times=FOREVER, status=503)
    elif case == "head-hang":  # every HEAD runs into the client's timeout (HF_HUB_ETAG_TIMEOUT)
        hub.storage.add_fault("hang", method="HEAD", path=RESOLVE, times=FOREVER, seconds=3 * TIMEOUT_S)
    elif case == "head-refused":  # the listing answers; nothing listens where the files are
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants.ENDPOINT, dead))
    elif case == "hub-refused":  # nothing listens at HF_ENDPOINT
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants.ENDPOINT, dead))
        monkeypatch.setattr(constants, "ENDPOINT", dead)
    else:  # pragma: no cover - a typo in a parameter
        raise ValueError(case)


def cached_files(cache: Path) -> list[Path]:
    """Every file (or link) in the HF cache, but huggingface_hub's lock files."""
    if not cache.exists():
        return []
    return [p for p in cache.rglob("*") if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts]


#: case -> (what the message must name as asked, what it must name as failed)
CASES = {
    "head-503": (rf"HEAD .*{FIRST_FILE}", r"HTTP 503"),
    "listing-503": (r"list the files", r"HTTP 503"),
    "head-refused": (rf"HEAD .*{FIRST_FILE}", r"(?i)refused"),
    "head-hang": (rf"HEAD .*{FIRST_FILE}", r"(?i)timed out|timeout"),
    "hub-refused": (r"list the files", r"(?i)refused"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hub_failing_every_time_gives_a_clear_error_within_the_bound(hub, published, knobs, tmp_path, monkeypatch,
                                                                      refused_port, case):
    fail_forever(hub, monkeypatch, refused_port, case)
    start = time.monotonic()
    with pytest.raises(HubError) as raised:
        pull_adapter(REPO, cache_dir=hub.cache_dir)
    elapsed = time.monotonic() - start
    message = str(raised.value)
    assert elapsed < BOUND_S, f"gave up after {elapsed:.1f} s, above the documented {BOUND_S:.1f} s: {message}"
    asked, failed = CASES[case]
    assert REPO in message and re.search(asked, message), message  # what was asked
    assert re.search(failed, message), message  # what failed
    assert re.search(rf"tried {ATTEMPTS} times over \d+(\.\d+)? s", message), message  # attempts, time
    assert "HF_ENDPOINT" in message and "retry" in message and "MOA_HUB_RETRIES" in message, message  # next step
    assert cached_files(hub.cache_dir) == []
    assert not (tmp_path / "moa-home").exists() or not any((tmp_path / "moa-home").rglob("*"))


def test_every_failing_head_is_sent_once_per_attempt(hub, published, knobs, monkeypatch, refused_port):
    """No hidden backoff inside an attempt: the Hub sees ``MOA_HUB_RETRIES`` HEADs, then moa gives up."""
    fail_forever(hub, monkeypatch, refused_port, "head-503")
    with pytest.raises(HubError):
        pull_adapter(REPO, cache_dir=hub.cache_dir)
    assert hub.count("HEAD", "/resolve/") == ATTEMPTS


def test_moa_pull_to_a_folder_leaves_no_folder(hub, published, knobs, tmp_path, monkeypatch, refused_port, capsys):
    from moa.cli import main

    fail_forever(hub, monkeypatch, refused_port, "head-503")
    out = tmp_path / "out"
    start = time.monotonic()
    assert main(["pull", REPO, "--out", str(out), "--cache-dir", str(hub.cache_dir), "-q"]) == 1
    assert time.monotonic() - start < BOUND_S
    err = capsys.readouterr().err
    assert err.startswith("moa pull: error:") and "HTTP 503" in err and "MOA_HUB_RETRIES" in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert cached_files(hub.cache_dir) == []


def test_the_pull_succeeds_once_the_hub_answers_again(hub, published, knobs, monkeypatch, refused_port):
    from moa.hub.verify import sha256_file

    fail_forever(hub, monkeypatch, refused_port, "head-503")
    with pytest.raises(HubError):
        pull_adapter(REPO, cache_dir=hub.cache_dir)
    hub.storage.clear_faults()
    folder = pull_adapter(REPO, cache_dir=hub.cache_dir)
    assert {name: sha256_file(folder / name) for name in published} == published
    assert hub.count("HEAD", "/resolve/") == ATTEMPTS + len(published)  # cached files are not asked for again
    assert pull_adapter(REPO, cache_dir=hub.cache_dir) == folder


def test_the_documented_bound(knobs, monkeypatch):
    from moa.hub import download

    assert download.give_up_bound_s() == pytest.approx(BOUND_S)  # what these tests assert elapsed against
    monkeypatch.setenv("MOA_HUB_RETRIES", "3")
    monkeypatch.delenv("MOA_HUB_RETRY_WAIT_S", raising=False)
    assert download.retry_waits() == [0.5, 1.0]
    assert download.give_up_bound_s(10) == 3 * 2 * 10 + 1.5
    monkeypatch.setenv("MOA_HUB_RETRIES", "8")
    monkeypatch.setenv("MOA_HUB_RETRY_WAIT_S", "2")
    assert download.retry_waits() == [2, 4, 8, 8, 8, 8, 8]  # doubled, at most RETRY_MAX_WAIT_S
    for bad in ("-1", "x", "nan", "inf", "1e9"):
        monkeypatch.setenv("MOA_HUB_RETRY_WAIT_S", bad)
        assert download.retry_waits()[0] == download.RETRY_WAIT_S
    monkeypatch.setenv("MOA_HUB_RETRY_WAIT_S", "0")
    assert download.retry_waits() == [0.0] * 7
