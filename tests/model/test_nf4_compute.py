"""NF4 compute dtype: the model's dtype unless asked; bfloat16 compute is exactly a bf16 matmul with the dequantized weight."""

from __future__ import annotations

import pytest
import torch

from moa.errors import UnsupportedQuantizationError
from moa.model import nf4_compute
from moa.model.base_loading import is_quantized_linear, load_base
from moa.model.nf4_compute import default_nf4_compute_dtype, set_nf4_compute_dtype
from moa.testing.fixtures import random_input_ids, save_tiny_base

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny-base"))


def test_default_is_the_model_dtype(monkeypatch):
    monkeypatch.delenv(nf4_compute.ENV_VAR, raising=False)
    assert default_nf4_compute_dtype(torch.device("cpu"), torch.float32) == torch.float32
    assert default_nf4_compute_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_for_float32_on_a_bf16_cpu(monkeypatch, native):
    monkeypatch.setenv(nf4_compute.ENV_VAR, "auto")
    monkeypatch.setattr(nf4_compute, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert default_nf4_compute_dtype(cpu, torch.float32) == (torch.bfloat16 if native else torch.float32)
    assert default_nf4_compute_dtype(cpu, torch.float16) == torch.float16


def test_env_names_a_dtype_or_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(nf4_compute.ENV_VAR, "BF16")
    assert default_nf4_compute_dtype(torch.device("cpu"), torch.float32) == torch.bfloat16
    monkeypatch.setenv(nf4_compute.ENV_VAR, "int4")
    with pytest.raises(UnsupportedQuantizationError, match=r"MOA_NF4_COMPUTE_DTYPE='int4'.*'auto'.*'bfloat16'"):
        default_nf4_compute_dtype(torch.device("cpu"), torch.float32)


def test_load_base_applies_the_default_the_env_and_the_argument(tiny_dir, monkeypatch):
    monkeypatch.delenv(nf4_compute.ENV_VAR, raising=False)
    default, _ = load_base(tiny_dir, quantization="nf4")
    forced, _ = load_base(tiny_dir, quantization="nf4", compute_dtype=torch.bfloat16)
    monkeypatch.setenv(nf4_compute.ENV_VAR, "bfloat16")
    from_env, _ = load_base(tiny_dir, quantization="nf4")
    for model, want in ((default, torch.float32), (forced, torch.bfloat16), (from_env, torch.bfloat16)):
        assert {m.compute_dtype for m in model.modules() if is_quantized_linear(m)} == {want}


@pytest.mark.parametrize("grad", [False, True])
def test_bf16_compute_is_a_bf16_matmul_with_the_dequantized_weight(tiny_dir, grad):
    """Independent reference: dequantize with bitsandbytes, round both operands to bf16, one matmul."""
    model, _ = load_base(tiny_dir, quantization="nf4", compute_dtype=torch.float32)
    assert set_nf4_compute_dtype(model, torch.bfloat16) == 7 * len(model.model.layers)
    layer = model.model.layers[1].mlp.down_proj
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(5, layer.in_features, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        got = layer(x)
    want = (x.detach().bfloat16() @ weight.bfloat16().t()).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    if grad:
        got.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_bf16_compute_stays_close_to_float32_compute(tiny_dir):
    tokens = random_input_ids()
    model, _ = load_base(tiny_dir, quantization="nf4", compute_dtype=torch.float32)
    with torch.no_grad():
        fp32 = model(tokens).logits
        set_nf4_compute_dtype(model, torch.bfloat16)
        bf16 = model(tokens).logits
    assert not torch.equal(fp32, bf16)
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 0.02


def test_unknown_compute_dtype_lists_the_choices(tiny_dir):
    model, _ = load_base(tiny_dir, quantization="nf4")
    with pytest.raises(UnsupportedQuantizationError, match=r"torch.int8.*torch.float32"):
        set_nf4_compute_dtype(model, torch.int8)
