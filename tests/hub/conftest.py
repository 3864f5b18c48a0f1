"""Fixtures of the Hub tests: the Hub test server (one per session) and a clean Hub per test."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

from tests.hub.server import HOST, HubServer
from tests.hub.storage import HubStorage


@pytest.fixture(scope="session")
def hub_server():
    """The Hub test server on the 127.0.0.1 port tests/conftest.py put in HF_ENDPOINT."""
    from huggingface_hub import constants

    endpoint = os.environ["HF_ENDPOINT"]
    if constants.ENDPOINT != endpoint:
        pytest.fail(f"huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT ({constants.ENDPOINT} "
                    f"!= {endpoint}); nothing may import it earlier.")
    url = urlsplit(endpoint)
    assert url.hostname == HOST, f"HF_ENDPOINT must point at {HOST}, not {url.hostname}"
    try:
        server = HubServer(url.port, HubStorage(), max_lifetime_s=3600).start()
    except OSError as error:  # the port tests/conftest.py found free was taken since
        pytest.fail(f"Cannot serve the Hub test server on {endpoint}: {error}. Run the tests again.")
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Hub:
    """One test's view of the server: its storage and a private HF cache folder."""

    server: HubServer
    cache_dir: Path

    @property
    def storage(self) -> HubStorage:
        return self.server.storage

    def count(self, method: str, fragment: str) -> int:
        """How many logged requests used ``method`` on a path containing ``fragment``."""
        return sum(1 for m, p in list(self.storage.requests) if m == method and fragment in p)


@pytest.fixture(params=["lfs", "inline"])
def upload_mode(request) -> str:
    """Both ways the Hub takes files: LFS objects (batch API + PUT) or base64 inside the commit."""
    return request.param


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch, request) -> Hub:
    """An empty Hub (mode from ``upload_mode`` when the test uses it, else LFS) and an empty cache."""
    from huggingface_hub import constants

    mode = request.getfixturevalue("upload_mode") if "upload_mode" in request.fixturenames else "lfs"
    hub_server.storage.reset(mode)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return Hub(hub_server, cache)


def go_offline(monkeypatch) -> None:
    """Make huggingface_hub (and moa) behave as with HF_HUB_OFFLINE=1 set before import."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def go_online(monkeypatch) -> None:
    """Undo :func:`go_offline`."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def add_lora(model, name: str, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj")) -> None:
    """Give ``model`` a LoRA adapter with random (non-zero) weights."""
    import moa

    torch.manual_seed(seed)
    model.add_adapter(name, moa.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                           init_lora_weights=False))


@pytest.fixture(scope="module")
def adapter_folder(tiny_base_dir, tmp_path_factory) -> Path:
    """An adapter folder (PEFT layout) to push: a random rank-4 LoRA of the tiny base."""
    from moa.testing.fixtures import make_tiny_model

    model = make_tiny_model(tiny_base_dir)
    add_lora(model, "ad", seed=5)
    folder = tmp_path_factory.mktemp("adapter") / "ad"
    model.save_adapter("ad", folder)
    return folder


def logits(model, input_ids, name: str | None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, adapter_names=[name] * len(input_ids)).logits
