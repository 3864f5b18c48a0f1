"""One batch over every adapter type: LoRA, VeRA, AdaLoRA, LoHa, LoKr, prompt tuning, prefix tuning and the base.

Each row must equal the same row run alone (fp32, 1e-5), in ``forward`` and in greedy
``generate``; a row mixing Linear-level types is the weighted sum of their changes, and a
row carries one input-level adapter plus Linear-level ones. The types come from their
installed plugin packages, as a user gets them.
"""

from __future__ import annotations

import pytest
import torch

import moa
from moa.testing import load_tiny_base, make_tiny_model, random_input_ids, require_plugin

moa_vera = require_plugin("moa-vera", "moa_vera")
moa_adalora = require_plugin("moa-adalora", "moa_adalora")
moa_lycoris = require_plugin("moa-lycoris", "moa_lycoris")
moa_prompt_tuning = require_plugin("moa-prompt-tuning", "moa_prompt_tuning")

TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = ["q_proj", "v_proj", "down_proj"]
ROWS = [
    "lora",
    "vera",
    "adalora",
    "loha",
    "lokr",
    "prompt",
    "prefix",
    None,
    {"lora": 0.4, "vera": 0.3, "loha": 0.3},  # Linear-level types mixed in one row
    {"prompt": 1.0, "adalora": 0.5},  # an input-level adapter plus a Linear-level one
]


@pytest.fixture(scope="module")
def model(tiny_base_dir):
    torch.manual_seed(0)
    model = make_tiny_model(tiny_base_dir)
    configs = {
        "lora": moa.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False),
        "vera": moa_vera.VeraConfig(r=8, target_modules=TARGETS),
        "adalora": moa_adalora.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=TARGETS),
        "loha": moa_lycoris.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False),
        "lokr": moa_lycoris.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False),
        "prompt": moa_prompt_tuning.PromptTuningConfig(num_virtual_tokens=3),
        "prefix": moa_prompt_tuning.PrefixTuningConfig(num_virtual_tokens=2),
    }
    for name, config in configs.items():
        model.add_adapter(name, config)
    with torch.no_grad():  # no adapter may start as the identity, or the test could not fail
        for name in ("vera", "adalora"):
            for layer in model.adapter_layers(name).values():
                for param in layer.parameters():
                    param.normal_(0.0, 0.5)
    model.eval()
    return model


def test_the_types_come_from_their_plugins(model):
    kinds = {name: config.peft_type for name, config in model.peft_config.items()}
    assert kinds == {"lora": "LORA", "vera": "VERA", "adalora": "ADALORA", "loha": "LOHA", "lokr": "LOKR",
                     "prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}


def test_every_adapter_changes_its_row(model):
    ids = random_input_ids(1, 6, seed=3)
    with torch.no_grad():
        base = model(ids, adapter_names=[None]).logits[:, -1]
        for name in model.peft_config:
            changed = model(ids, adapter_names=[name]).logits[:, -1]
            assert (changed - base).abs().max() > 1e-3, name


def test_mixed_forward_equals_each_row_alone(model):
    ids = random_input_ids(len(ROWS), 6, seed=5)
    weights = [row if isinstance(row, dict) else ({row: 1.0} if row else None) for row in ROWS]
    with torch.no_grad():
        batch = model(ids, adapter_weights=weights).logits
        for i, row in enumerate(weights):
            alone = model(ids[i:i + 1], adapter_weights=[row]).logits
            torch.testing.assert_close(batch[i:i + 1], alone, **TOL, msg=lambda m, r=row: f"{r}: {m}")


def test_linear_level_mixture_is_the_weighted_sum_of_changes(model, tiny_base_dir):
    """Independent reference: a plain transformers base whose weights get sum_n w_n * dW_n added by hand."""
    mixture = {"lora": 0.4, "vera": 0.3, "loha": 0.3}
    reference = load_tiny_base(tiny_base_dir).eval()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, weight in mixture.items():
            for module_name, adapter in model.adapter_layers(name).items():
                if adapter.low_rank() is not None:
                    a, b, scale = adapter.low_rank()
                    delta = scale * b.float() @ a.float()
                else:
                    delta = adapter.delta_weight().float()
                modules[module_name].weight += weight * delta
        ids = random_input_ids(2, 6, seed=9)
        got = model(ids, adapter_weights=[mixture, mixture]).logits
        torch.testing.assert_close(got, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_mixed_generate_equals_each_row_alone(model):
    ids = random_input_ids(len(ROWS), 5, seed=7)
    weights = [row if isinstance(row, dict) else ({row: 1.0} if row else None) for row in ROWS]
    with torch.no_grad():
        out = model.generate(ids, adapter_weights=weights, max_new_tokens=6, do_sample=False)
        for i, row in enumerate(weights):
            alone = model.generate(ids[i:i + 1], adapter_weights=[row], max_new_tokens=6, do_sample=False)
            assert torch.equal(out[i:i + 1], alone), row


def test_undefined_mixtures_are_refused_clearly(model):
    ids = random_input_ids(1, 4)
    with pytest.raises(moa.MoaError, match="prefix"):
        model(ids, adapter_weights=[{"prefix": 0.5, "prompt": 0.5}])
