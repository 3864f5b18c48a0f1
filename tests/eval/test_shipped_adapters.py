"""The shipped demo adapters and gate: intact (sha256), small, PEFT-shaped, consistent with the recipe."""

from __future__ import annotations

import hashlib
import json

import pytest

from moa.eval.assets import adapter_folders, shipped_adapters_dir
from moa.routing.learned_gate import LearnedGate
from moa.train.recipes import DEMO_RECIPE

SHIPPED = shipped_adapters_dir()
pytestmark = pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="demo adapters not trained yet")


def test_every_shipped_file_matches_the_manifest_and_fits_20_mb():
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    on_disk = {str(p.relative_to(SHIPPED)) for p in SHIPPED.rglob("*") if p.is_file() and p.name != "manifest.json"
               and "__pycache__" not in p.parts}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name
    assert sum((SHIPPED / n).stat().st_size for n in on_disk) <= 20_000_000


def test_adapters_follow_the_recipe_and_the_gate_reads_their_first_layer():
    folders = adapter_folders(SHIPPED)
    assert list(folders) == ["sql", "arithmetic", "icd", "french", "code"]
    for folder in folders.values():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == DEMO_RECIPE.rank
        metrics = json.loads((folder / "train_metrics.json").read_text())
        assert metrics["steps"] == DEMO_RECIPE.steps_for(metrics["domain"]) and metrics["quantization"] == "nf4"
    gate = LearnedGate.load(SHIPPED / "router")
    assert gate.hidden_layer == DEMO_RECIPE.first_layer and gate.gate_adapters == list(folders)


def test_shipped_adapter_configs_name_the_base_by_its_hub_id():
    """PEFT's AutoPeftModelForCausalLM loads the base named here: a Hub id, never a path of the training machine."""
    from moa.model.default_base import DEFAULT_BASE_ID

    folders = adapter_folders(SHIPPED)
    assert folders
    for name, folder in folders.items():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == DEFAULT_BASE_ID == "HuggingFaceTB/SmolLM2-135M-Instruct", name
