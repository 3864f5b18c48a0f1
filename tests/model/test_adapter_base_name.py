"""``base_model_name_or_path`` in a saved ``adapter_config.json``: the base's Hub id, not a local path.

PEFT's ``AutoPeftModelForCausalLM.from_pretrained(adapter)`` loads the base named there, so a
path on the machine that saved the adapter breaks it everywhere else. When the base's Hub id
is known (the default base, a folder with moa's conversion marker, a folder in the HF cache),
moa writes the Hub id.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moa
from moa.adapters.peft_format import CONFIG_NAME, is_local_path, portable_base_model_name
from moa.model.base_loading import base_hub_id, describe_base
from moa.model.default_base import DEFAULT_BASE_ID, MARKER_FILENAME, default_base_dir
from moa.testing.fixtures import save_tiny_base


def saved_base_name(base_folder: Path, out: Path, **config) -> str:
    """Load ``base_folder`` (dense), add a LoRA, save it to ``out``; its ``base_model_name_or_path``."""
    model = moa.MixtureModel.from_pretrained(str(base_folder), quantization=None, device="cpu")
    model.add_adapter("a", moa.LoraConfig(target_modules=["q_proj"], **config))
    model.save_adapter("a", out)
    return json.loads((out / CONFIG_NAME).read_text())["base_model_name_or_path"]


def test_local_folder_whose_marker_names_the_hub_id_saves_the_hub_id(tmp_path):
    folder = save_tiny_base(tmp_path / "bases" / "tiny")
    (folder / MARKER_FILENAME).write_text(json.dumps({"format": 1, "model_id": "moa-test/tiny-llama"}))
    assert saved_base_name(folder, tmp_path / "adapter") == "moa-test/tiny-llama"
    # an adapter config that already carries a local path (e.g. loaded from an old folder) is fixed too
    stale = saved_base_name(folder, tmp_path / "stale", base_model_name_or_path=str(folder.resolve()))
    assert stale == "moa-test/tiny-llama"
    # another Hub id set on purpose is kept
    assert saved_base_name(folder, tmp_path / "mine", base_model_name_or_path="org/other") == "org/other"


def test_default_base_folder_saves_the_default_hub_id_wherever_moa_home_is(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_HOME", str(tmp_path / "home"))
    folder = save_tiny_base(default_base_dir())  # stands in for the converted default base (no marker)
    assert saved_base_name(folder, tmp_path / "adapter") == DEFAULT_BASE_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_folder_in_the_hugging_face_cache_saves_its_repo_id(tmp_path):
    folder = save_tiny_base(tmp_path / "hub" / "models--moa-test--tiny-llama" / "snapshots" / ("a" * 40))
    assert saved_base_name(folder, tmp_path / "adapter") == "moa-test/tiny-llama"


def test_folder_of_unknown_origin_keeps_peft_behaviour(tmp_path):
    folder = save_tiny_base(tmp_path / "tiny")
    model = moa.MixtureModel.from_pretrained(str(folder), quantization=None, device="cpu")
    assert base_hub_id(model.base_model) is None
    assert describe_base(model.base_model)["model_id"] == str(folder)
    assert saved_base_name(folder, tmp_path / "adapter") == str(folder)  # as PEFT: no Hub id known


def test_portable_base_model_name_rules(tmp_path):
    assert portable_base_model_name(None, "/data/base", "org/base") == "org/base"
    assert portable_base_model_name("/data/base", "/data/base", "org/base") == "org/base"
    assert portable_base_model_name("~/base", None, "org/base") == "org/base"
    assert portable_base_model_name("org/other", "/data/base", "org/base") == "org/other"
    assert portable_base_model_name(None, "/data/base", None) == "/data/base"
    assert portable_base_model_name("org/x", "/data/base", None) == "org/x"
    assert portable_base_model_name(None, None, None) is None
    assert is_local_path(str(tmp_path)) and is_local_path("C:\\\\models\\\\x") and not is_local_path("org/base")


@pytest.mark.parametrize("marker", ["{not json", json.dumps({"model_id": "../escape"}), json.dumps(["x"])])
def test_unusable_markers_are_ignored(tmp_path, marker):
    folder = save_tiny_base(tmp_path / "tiny")
    (folder / MARKER_FILENAME).write_text(marker)
    model = moa.MixtureModel.from_pretrained(str(folder), quantization=None, device="cpu")
    assert base_hub_id(model.base_model) is None
