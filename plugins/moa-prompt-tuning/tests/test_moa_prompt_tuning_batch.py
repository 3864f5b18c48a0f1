"""One batch, one forward, one generate: two prompt-tuning adapters of different lengths, a prefix-tuning
row, a LoRA row and a base row, each equal to that row alone, and the prompt-tuning rows equal to PEFT."""

from __future__ import annotations

import pytest
import torch

import moa
from moa.errors import RoutingError
from moa.testing import load_tiny_base, make_tiny_model, random_input_ids, require_plugin

moa_prompt_tuning = require_plugin("moa-prompt-tuning", "moa_prompt_tuning")
peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-5)
NAMES = ["pt3", "pt5", "prefix4", "lora", None]


@pytest.fixture
def setup(moa_tiny_base_dir, moa_plugin_manager, tmp_path):
    """A moa model with the five kinds of rows, and the PEFT model of each input-level adapter."""
    torch.manual_seed(0)
    configs = {
        "pt3": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "pt5": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "pt3b": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "prefix4": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }
    model = make_tiny_model(moa_tiny_base_dir)
    references = {}
    for name, config in configs.items():
        references[name] = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir), config).eval()
        references[name].save_pretrained(tmp_path / name)
        model.load_adapter(tmp_path / name, adapter_name=name)
    model.add_adapter("lora", moa.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model, references


def test_mixed_forward_equals_each_row_alone_and_peft(setup):
    model, references = setup
    ids = random_input_ids(5, 6, seed=11)
    with torch.no_grad():
        batch = model(ids, adapter_names=NAMES).logits
        assert batch.shape == (5, 6, model.config.vocab_size)
        for i, name in enumerate(NAMES):
            alone = model(ids[i:i + 1], adapter_names=[name]).logits
            torch.testing.assert_close(batch[i:i + 1], alone, **TOL)
            if name in references:
                peft_out = references[name](ids[i:i + 1]).logits[:, -6:]
                torch.testing.assert_close(batch[i:i + 1], peft_out, **TOL)
        base = load_tiny_base(model.config._name_or_path)(ids[4:]).logits
    torch.testing.assert_close(batch[4:], base, **TOL)


def test_mixed_generate_equals_each_row_alone_and_peft(setup):
    model, references = setup
    ids = random_input_ids(5, 5, seed=12)
    with torch.no_grad():
        out = model.generate(ids, adapter_names=NAMES, max_new_tokens=8, do_sample=False)
        assert out.shape == (5, 13) and torch.equal(out[:, :5], ids)
        for i, name in enumerate(NAMES):
            alone = model.generate(ids[i:i + 1], adapter_names=[name], max_new_tokens=8, do_sample=False)
            assert torch.equal(out[i:i + 1], alone), name
            if name in references:
                row = ids[i:i + 1]
                peft_out = references[name].generate(input_ids=row, attention_mask=torch.ones_like(row),
                                                     max_new_tokens=8, do_sample=False)
                assert torch.equal(out[i:i + 1], peft_out), name


def test_mixture_of_two_prompt_tuning_adapters_is_the_weighted_sum_of_embeddings(setup, moa_tiny_base_dir):
    model, references = setup
    ids = random_input_ids(2, 5, seed=13)
    a = references["pt3"].prompt_encoder["default"].embedding.weight
    b = references["pt3b"].prompt_encoder["default"].embedding.weight
    mixed = peft.get_peft_model(load_tiny_base(moa_tiny_base_dir),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    with torch.no_grad():
        mixed.prompt_encoder["default"].embedding.weight.copy_(0.6 * a + 0.4 * b)
        got = model(ids, adapter_weights=[{"pt3": 3.0, "pt3b": 2.0}, {"lora": 1.0}]).logits
        torch.testing.assert_close(got[:1], mixed(ids[:1]).logits[:, -5:], **TOL)


def test_input_level_adapter_with_lora_in_one_row(setup):
    model, _ = setup
    ids = random_input_ids(2, 5, seed=14)
    with torch.no_grad():
        both = model(ids, adapter_weights=[{"pt5": 1.0, "lora": 0.5}, {"prefix4": 2.0, "lora": 1.0}]).logits
        for i, row in enumerate([{"pt5": 1.0, "lora": 0.5}, {"prefix4": 1.0, "lora": 1.0}]):
            torch.testing.assert_close(both[i:i + 1], model(ids[i:i + 1], adapter_weights=[row]).logits, **TOL)
        without = model(ids[:1], adapter_names=["pt5"]).logits
    assert not torch.allclose(both[:1], without, atol=1e-3)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"pt3": 1.0, "pt5": 1.0}, "different num_virtual_tokens"),
        ({"prefix4": 1.0, "pt3": 1.0}, "different types"),
        ({"prefix4": 0.5, "prefix4b": 0.5}, "prefix-tuning adapters cannot be mixed"),
    ],
)
def test_mixtures_without_a_definition_are_refused(setup, tmp_path, row, message):
    model, _ = setup
    model.add_adapter("prefix4b", moa_prompt_tuning.PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(RoutingError, match=message):
        model(random_input_ids(2, 4), adapter_weights=[row, None])


def test_prompt_and_prefix_tuning_train(moa_tiny_model, moa_plugin_manager):
    model = moa_tiny_model
    model.add_adapter("pt", moa_prompt_tuning.PromptTuningConfig(num_virtual_tokens=4))
    model.add_adapter("px", moa_prompt_tuning.PrefixTuningConfig(num_virtual_tokens=4))
    ids = random_input_ids(4, 10, seed=7)
    params = [model.input_adapters.get(n).prompt_embeddings for n in ("pt", "px")]
    optimizer = torch.optim.Adam(params, lr=5e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, adapter_names=["pt", "px", "pt", "px"], labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in model.base_model.parameters())
