"""moa.compat: each foreign private name or version-dependent API moa uses, checked against the installed release.

A release of bitsandbytes, transformers or huggingface_hub that renames or drops one of these
fails the test that names it here (``make test-oldest`` and ``make test-latest`` run these at
both ends of pyproject's ranges). The last test keeps those names out of the rest of moa.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moa import compat
from moa.hub import download
from moa.testing.fixtures import make_tiny_base

MOA = Path(__file__).resolve().parents[1] / "moa"


def test_bitsandbytes_convert_weight_packed_for_cpu_inverse_undoes_bnbs_cpu_packing():
    import bitsandbytes as bnb

    unpack = compat.bnb_cpu_unpack()
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    layer.support_avx512bf16_for_cpu = False
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = layer(x)
        layer.support_avx512bf16_for_cpu = True
        layer(x)  # packs the weight for bnb's CPU kernel, where this CPU has AVX512-BF16
        layer.support_avx512bf16_for_cpu = False
        state = layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = unpack(layer.weight.data, state)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)  # absmax may come back as bf16


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_transformers_config_attn_implementation_is_read(implementation):
    model = make_tiny_base()
    model.set_attn_implementation(implementation)
    assert compat.attn_implementation(model.config) == implementation
    assert compat.attn_implementation(object()) is None


def test_transformers_tied_weights_keys_name_the_tied_head():
    model = make_tiny_base()
    keys = compat.tied_weights_keys(model)
    assert "lm_head.weight" in keys  # LlamaForCausalLM declares its head as tied (used if the config ties)
    assert compat.tied_weights_keys(torch.nn.Linear(2, 2)) == set()


@pytest.mark.parametrize("enabled", [True, False])
def test_training_arguments_take_the_checkpointing_keyword(tmp_path, enabled):
    from transformers import TrainingArguments

    options = compat.checkpointing_argument(enabled)
    arguments = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **options)
    assert getattr(arguments, next(iter(options))) is enabled


def test_a_refused_hub_connection_is_a_transport_error():
    from huggingface_hub import HfApi

    with pytest.raises(Exception) as caught:
        HfApi(endpoint="http://127.0.0.1:9").model_info("alice/nothing")  # nothing listens on port 9
    assert isinstance(caught.value, compat.hub_transport_errors())
    assert download.is_transient(caught.value)


def test_foreign_private_names_appear_only_in_moa_compat():
    names = re.compile(r"_convert_weight_packed_for_cpu_inverse|\._attn_implementation\b|_tied_weights_keys")
    found = [f"{path.relative_to(MOA.parent)}:{number}"
             for path in sorted(MOA.rglob("*.py")) if path.name != "compat.py"
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if names.search(line)]
    assert found == []
