"""Model cards: YAML metadata the Hub (and huggingface_hub.ModelCard) reads, usage for moa and PEFT."""

from __future__ import annotations

from huggingface_hub import ModelCard

from moa.hub.manifest import AdapterPin, BaseSpec, MixtureManifest
from moa.hub.model_card import render_adapter_card, render_mixture_card

BASE = {"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "fingerprint": "ab" * 12, "quantization": "nf4"}
CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def test_adapter_card_metadata_and_snippets():
    text = render_adapter_card(repo_id="alice/sql-lora", config=CONFIG, base=BASE, domains=["sql"],
                               license="apache-2.0", metrics={"exact_match": 0.61}, files={"a.json": "0" * 64})
    card = ModelCard(text)
    assert card.data.base_model == BASE["model_id"] and card.data.library_name == "peft"
    assert card.data.license == "apache-2.0" and {"moa", "peft", "lora", "sql"} <= set(card.data.tags)
    assert card.data.eval_results[0].metric_value == 0.61
    assert 'model.load_adapter("alice/sql-lora"' in text and 'PeftModel.from_pretrained(base, "alice/sql-lora")' in text
    assert "| `a.json` | `" + "0" * 64 in text


def test_local_base_is_not_written_as_base_model_and_license_is_optional():
    card = ModelCard(render_adapter_card(repo_id="a/b", config=CONFIG, base={"model_id": "/tmp/tiny", "fingerprint": "x"}))
    assert card.data.base_model is None and card.data.license is None and card.data.moa["base_fingerprint"] == "x"


def test_mixture_card_lists_every_pin():
    manifest = MixtureManifest(BaseSpec(BASE["model_id"], BASE["fingerprint"], "nf4"),
                               [AdapterPin("sql", "alice/sql", "c" * 40, {"x.json": "0" * 64})])
    text = render_mixture_card(manifest, repo_id="alice/mix")
    assert ModelCard(text).data.library_name == "moa" and "| `sql` | `alice/sql` | `cccccccccccc` | 1 |" in text
