"""PEFT's everyday spellings work on a MixtureModel, checked against real ``peft``."""

from __future__ import annotations

import peft
import pytest
import torch

import moa
from moa.testing.fixtures import load_tiny_base, make_tiny_model, random_input_ids, save_tiny_base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def pair(base_dir, tmp_path):
    """The same random adapter in moa and in PEFT."""
    model = make_tiny_model(base_dir)
    torch.manual_seed(0)
    model.add_adapter("sql", moa.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights=False))
    model.save_adapter("sql", tmp_path / "sql")
    peft_model = peft.PeftModel.from_pretrained(load_tiny_base(base_dir), tmp_path / "sql", adapter_name="sql")
    return model, peft_model.eval()


@torch.no_grad()
def test_disable_adapter_is_a_context_manager_like_peft(pair):
    model, peft_model = pair
    ids = random_input_ids()
    with model.disable_adapter(), peft_model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)
        base = model(ids).logits
    adapted = model(ids).logits
    torch.testing.assert_close(adapted, peft_model(ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-4)  # back on after the block
    with model.disable_adapters():  # moa's older spelling still works
        assert torch.equal(model(ids).logits, base)


def test_active_adapter_and_get_base_model_like_peft(pair):
    model, peft_model = pair
    assert model.active_adapter == peft_model.active_adapter == "sql"
    assert model.active_adapters == peft_model.active_adapters == ["sql"]
    assert model.get_base_model() is model.base_model
    assert type(model.get_base_model()) is type(peft_model.get_base_model())
    for getter in ("get_input_embeddings", "get_output_embeddings"):  # the base's modules, as PEFT answers
        assert getattr(model, getter)() is getattr(model.base_model, getter)()
        assert type(getattr(model, getter)()) is type(getattr(peft_model, getter)())
    model.add_adapter("code", moa.LoraConfig(r=2, target_modules=["q_proj"]))
    model.set_adapter(["sql", "code"])
    assert model.active_adapter == ["sql", "code"]
    model.delete_adapter("sql")
    model.delete_adapter("code")
    assert model.active_adapter is None


def test_gradient_checkpointing_enable_refuses_reentrant(pair):
    model, _ = pair
    with pytest.raises(moa.MoaError, match="use_reentrant=False"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


@torch.no_grad()
def test_a_model_loaded_for_inference_applies_no_adapter_dropout(base_dir):
    """Like PEFT and transformers: eval mode after loading; dropout only after model.train()."""
    model = make_tiny_model(base_dir)
    torch.manual_seed(0)
    model.add_adapter("d", moa.LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear", init_lora_weights=False))
    assert not model.training and not any(layer.training for layer in model.mixture_layers())
    ids = random_input_ids()
    assert torch.equal(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is on now
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)
