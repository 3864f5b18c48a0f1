"""Prompt-tuning and prefix-tuning folders move between PEFT and moa with the same logits (fp32, 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch

from moa.testing import load_tiny_base, make_tiny_model, random_input_ids, require_plugin

moa_prompt_tuning = require_plugin("moa-prompt-tuning", "moa_prompt_tuning")
peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
KINDS = {
    "prompt_tuning": (peft.PromptTuningConfig, moa_prompt_tuning.PromptTuningConfig),
    "prefix_tuning": (peft.PrefixTuningConfig, moa_prompt_tuning.PrefixTuningConfig),
}


def peft_logits(peft_model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """PEFT's logits of the real tokens (prompt tuning also returns the virtual positions' logits)."""
    with torch.no_grad():
        return peft_model(ids, **kwargs).logits[:, -ids.shape[1]:]


def greedy(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              **kwargs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_peft_saved_folder_loads_in_moa_with_same_logits_and_tokens(kind, moa_tiny_base_dir, moa_plugin_manager,
                                                                    tmp_path):
    torch.manual_seed(0)
    peft_config = KINDS[kind][0](task_type="CAUSAL_LM", num_virtual_tokens=5)
    peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir), peft_config).eval()
    peft_model.save_pretrained(tmp_path / kind)
    ids = random_input_ids(3, 6)
    model = make_tiny_model(moa_tiny_base_dir)
    model.load_adapter(tmp_path / kind, adapter_name="a")
    assert isinstance(model.peft_config["a"], KINDS[kind][1])
    with torch.no_grad():
        got = model(ids, adapter_names=["a"] * 3).logits
        base = model(ids, adapter_names=[None] * 3).logits
    torch.testing.assert_close(got, peft_logits(peft_model, ids), **TOL)
    assert not torch.allclose(got, base, atol=1e-3)
    assert torch.equal(greedy(model, ids, adapter_names=["a"] * 3), greedy(peft_model, ids))


@pytest.mark.parametrize("kind", list(KINDS))
def test_moa_saved_folder_loads_in_peft_with_same_logits_and_tokens(kind, moa_tiny_base_dir, moa_plugin_manager,
                                                                    tmp_path):
    torch.manual_seed(1)
    model = make_tiny_model(moa_tiny_base_dir)
    model.add_adapter("m", KINDS[kind][1](num_virtual_tokens=4))
    model.save_adapter("m", tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert saved["peft_type"] == kind.upper() and saved["num_virtual_tokens"] == 4 and saved["inference_mode"]
    peft_model = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "m").eval()
    ids = random_input_ids(2, 7, seed=2)
    with torch.no_grad():
        got = model(ids, adapter_names=["m", "m"]).logits
    torch.testing.assert_close(got, peft_logits(peft_model, ids), **TOL)
    assert torch.equal(greedy(model, ids, adapter_names=["m", "m"]), greedy(peft_model, ids))


def test_prefix_layout_is_peft_key_value_cache(moa_tiny_base_dir, moa_plugin_manager):
    """Layer l's keys/values are PEFT's get_prompt() cache entries, head for head."""
    torch.manual_seed(2)
    peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir),
                                     peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    model = make_tiny_model(moa_tiny_base_dir)
    model.add_adapter("x", moa_prompt_tuning.PrefixTuningConfig(num_virtual_tokens=3))
    model.input_adapters.get("x").load_peft_state_dict(peft.get_peft_model_state_dict(peft_model))
    cache = peft_model.get_prompt(batch_size=1)
    for layer, (k, v) in enumerate(model.input_adapters.get("x").virtual_input().key_values):
        torch.testing.assert_close(k, cache.layers[layer].keys[0], rtol=0, atol=0)
        torch.testing.assert_close(v, cache.layers[layer].values[0], rtol=0, atol=0)


def test_text_init_matches_peft_and_round_trips(moa_tiny_base_dir, moa_plugin_manager, tmp_path):
    text = "Answer politely:"
    peft_config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20, prompt_tuning_init="TEXT",
                                          prompt_tuning_init_text=text, tokenizer_name_or_path=str(moa_tiny_base_dir))
    peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir), peft_config).eval()
    model = make_tiny_model(moa_tiny_base_dir)
    model.add_adapter("t", moa_prompt_tuning.PromptTuningConfig(num_virtual_tokens=20, prompt_tuning_init="TEXT",
                                                                prompt_tuning_init_text=text))
    mine = model.input_adapters.get("t").prompt_embeddings
    torch.testing.assert_close(mine, peft_model.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    # 16 text tokens repeated to 20: the 17th virtual token is the first text token again
    torch.testing.assert_close(mine[16], mine[0], rtol=0, atol=0)
    model.save_adapter("t", tmp_path / "t")
    saved = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init"] == "TEXT" and saved["tokenizer_name_or_path"]
    reloaded = peft.PeftModel.from_pretrained(load_tiny_base(moa_tiny_base_dir), tmp_path / "t").eval()
    ids = random_input_ids(1, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=["t"]).logits, peft_logits(reloaded, ids), **TOL)


def test_sample_vocab_init_uses_rows_of_the_embedding(moa_tiny_model, moa_plugin_manager):
    moa_tiny_model.add_adapter("s", moa_prompt_tuning.PromptTuningConfig(num_virtual_tokens=6,
                                                                         prompt_tuning_init="SAMPLE_VOCAB"))
    table = moa_tiny_model.get_input_embeddings().weight
    for row in moa_tiny_model.input_adapters.get("s").prompt_embeddings:
        assert torch.isclose(table, row, rtol=0, atol=0).all(dim=1).any()


def test_loss_equals_peft_loss(moa_tiny_base_dir, moa_plugin_manager, tmp_path):
    torch.manual_seed(3)
    for kind in KINDS:
        peft_model = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir),
                                         KINDS[kind][0](task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
        peft_model.save_pretrained(tmp_path / kind)
        model = make_tiny_model(moa_tiny_base_dir)
        model.load_adapter(tmp_path / kind, adapter_name="a")
        ids = random_input_ids(2, 6, seed=4)
        with torch.no_grad():
            torch.testing.assert_close(model(ids, adapter_names=["a", "a"], labels=ids).loss,
                                       peft_model(ids, labels=ids).loss, **TOL)
