"""LoHa and LoKr pass moa's adapter-type contract; their exact forms match a naive float64 reference."""

from __future__ import annotations

import pytest
import torch

from moa.errors import AdapterConfigError, AdapterShapeError
from moa.testing import AdapterTypeContract, require_plugin

moa_lycoris = require_plugin("moa-lycoris", "moa_lycoris")
from moa_lycoris import loha, lokr  # noqa: E402 - after the install check

TARGETS = ["q_proj", "k_proj", "up_proj", "down_proj"]
SHARED_BAD = (
    {"target_modules": []},
    {"target_modules": ["no_such_module"]},
    {"r": 0},
    {"r": True},
    {"alpha": "8"},
    {"alpha": float("nan")},
    {"rank_pattern": {"q_proj": 0}},
    {"rank_pattern": ["q_proj"]},
    {"alpha_pattern": {"q_proj(": 4}},
    {"rank_dropout": 1.0},
    {"module_dropout": -0.1},
    {"use_effective_conv2d": "yes"},
    {"exclude_modules": ["k_proj"]},
    {"layers_to_transform": [0]},
    {"layers_pattern": "layers"},
    {"modules_to_save": ["lm_head"]},
)


class TestLoHaContract(AdapterTypeContract):
    adapter_type = "loha"
    config_kwargs = {"r": 4, "alpha": 8, "target_modules": TARGETS}
    bad_config_kwargs = (*SHARED_BAD, {"init_weights": "lycoris"}, {"init_weights": 1})


class TestLoKrContract(AdapterTypeContract):
    """Default r=8 on the tiny base: both Kronecker factors are stored whole."""

    adapter_type = "lokr"
    config_kwargs = {"r": 8, "alpha": 4, "target_modules": TARGETS}
    bad_config_kwargs = (*SHARED_BAD, {"init_weights": "gaussian"}, {"decompose_factor": 0},
                         {"decompose_factor": -2}, {"decompose_both": 1}, {"rank_dropout_scale": "no"})


class TestLoKrDecomposedContract(TestLoKrContract):
    """r=1 with decompose_both: both Kronecker factors are stored as rank-1 products."""

    config_kwargs = {"r": 1, "alpha": 2, "decompose_both": True, "target_modules": TARGETS}


def naive_loha(w1a, w1b, w2a, w2b, scale):
    """``ΔW`` element by element."""
    out_f, in_f = w1a.shape[0], w1b.shape[1]
    delta = torch.zeros(out_f, in_f, dtype=torch.float64)
    for o in range(out_f):
        for i in range(in_f):
            delta[o, i] = (w1a[o] @ w1b[:, i]) * (w2a[o] @ w2b[:, i]) * scale
    return delta


def naive_kron(w1, w2, scale):
    """``kron(w1, w2)`` block by block."""
    (a, c), (b, d) = w1.shape, w2.shape
    delta = torch.zeros(a * b, c * d, dtype=torch.float64)
    for p in range(a):
        for i in range(c):
            delta[p * b:(p + 1) * b, i * d:(i + 1) * d] = w1[p, i] * w2
    return delta * scale


@pytest.mark.parametrize("out_f, in_f, rank", [(6, 10, 3), (24, 20, 2), (12, 12, 5)])
def test_loha_dense_and_factored_forms_equal_the_naive_weight(out_f, in_f, rank):
    g = torch.Generator().manual_seed(out_f)
    kw = dict(generator=g, dtype=torch.float64)
    w1a, w2a = torch.randn(out_f, rank, **kw), torch.randn(out_f, rank, **kw)
    w1b, w2b = torch.randn(rank, in_f, **kw), torch.randn(rank, in_f, **kw)
    x = torch.randn(7, in_f, **kw)
    expected = naive_loha(w1a, w1b, w2a, w2b, 0.75)
    torch.testing.assert_close(loha.hadamard_delta_weight(w1a, w1b, w2a, w2b, 0.75), expected)
    for form in (loha.hadamard_apply_dense, loha.hadamard_apply_factored):
        torch.testing.assert_close(form(x, w1a, w1b, w2a, w2b, 0.75), x @ expected.T)


@pytest.mark.parametrize("a, b, c, d", [(2, 3, 4, 5), (4, 8, 8, 8), (1, 7, 3, 1)])
def test_lokr_dense_and_kronecker_forms_equal_the_naive_weight(a, b, c, d):
    g = torch.Generator().manual_seed(a * b * c * d)
    kw = dict(generator=g, dtype=torch.float64)
    w1, w2 = torch.randn(a, c, **kw), torch.randn(b, d, **kw)
    x = torch.randn(5, c * d, **kw)
    expected = naive_kron(w1, w2, 0.5)
    torch.testing.assert_close(lokr.kron_delta_weight(w1, w2, 0.5), expected)
    for form in (lokr.kron_apply_dense, lokr.kron_apply_factored):
        torch.testing.assert_close(form(x, w1, w2, 0.5), x @ expected.T)


def test_layers_pick_the_form_by_size_and_both_give_delta_weight():
    """A small layer goes dense, a 256x256 one factored; either way ``delta`` is ``x @ delta_weight().T``,
    values and gradients."""
    assert not loha.factored_is_cheaper(4, 8, 64, 64) and loha.factored_is_cheaper(4, 8, 256, 256)
    assert not loha.factored_is_cheaper(512, 32, 576, 576)  # r² > 2·min(H_in, H_out)
    assert not lokr.kron_is_cheaper(64, 64) and lokr.kron_is_cheaper(256, 256)
    torch.manual_seed(0)
    for size in (64, 256):
        base = torch.nn.Linear(size, size)
        x = torch.randn(5, size)
        for layer in (moa_lycoris.LoHaLayer(moa_lycoris.LoHaConfig(r=4, init_weights=False), "m.q_proj", size, size),
                      moa_lycoris.LoKrLayer(moa_lycoris.LoKrConfig(r=2, decompose_both=True, init_weights=False),
                                            "m.q_proj", size, size)):
            layer.eval()
            upstream = torch.randn(5, size)
            got = layer.delta(x, base)
            (got * upstream).sum().backward()
            grads = [p.grad.clone() for p in layer.parameters()]
            layer.zero_grad()
            want = x @ layer.delta_weight().T
            (want * upstream).sum().backward()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for grad, param in zip(grads, layer.parameters(), strict=True):  # the same gradients too
                torch.testing.assert_close(grad, param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dimension", [1, 7, 32, 64, 96, 128, 192, 576, 1536, 127])
@pytest.mark.parametrize("factor", [-1, 1, 4, 5, 16])
def test_factorization_is_peft_s(dimension, factor):
    peft_lokr = pytest.importorskip("peft.tuners.lokr.layer")
    assert moa_lycoris.factorization(dimension, factor) == peft_lokr.factorization(dimension, factor)


def test_lokr_stores_the_tensors_peft_s_rules_pick():
    config = moa_lycoris.LoKrConfig(r=2, decompose_both=True, rank_pattern={"down_proj": 16})
    k_proj = moa_lycoris.LoKrLayer(config, "model.layers.0.self_attn.k_proj", 64, 32)
    assert (k_proj.out_split, k_proj.in_split) == ((4, 8), (8, 8))
    assert {n: tuple(t.shape) for n, t in k_proj.peft_state_dict().items()} == {
        "lokr_w1_a": (4, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    down = moa_lycoris.LoKrLayer(config, "model.layers.0.mlp.down_proj", 128, 64)
    assert {n: tuple(t.shape) for n, t in down.peft_state_dict().items()} == {"lokr_w1": (8, 8), "lokr_w2": (8, 16)}
    assert bool((k_proj.lokr_w1_a == 0).all()) and bool((down.lokr_w1 == 0).all())  # identity at start
    lycoris = moa_lycoris.LoKrLayer(moa_lycoris.LoKrConfig(init_weights="lycoris"), "m.q_proj", 64, 64)
    assert bool((lycoris.lokr_w2 == 0).all()) and bool((lycoris.lokr_w1 != 0).any())


def test_loaded_tensors_must_match_the_config_layout():
    layer = moa_lycoris.LoKrLayer(moa_lycoris.LoKrConfig(r=2, decompose_both=True), "m.k_proj", 64, 32)
    with pytest.raises(AdapterShapeError, match="decompose_both=True"):
        layer.load_peft_state_dict({"lokr_w1": torch.zeros(4, 8), "lokr_w2": torch.zeros(8, 8)})
    with pytest.raises(AdapterShapeError, match="lokr_w1_a"):
        layer.load_peft_state_dict({"lokr_w1_a": torch.zeros(4, 3), "lokr_w1_b": torch.zeros(2, 8),
                                    "lokr_w2_a": torch.zeros(8, 2), "lokr_w2_b": torch.zeros(2, 8)})


def test_patterns_set_rank_alpha_and_scale_per_module():
    config = moa_lycoris.LoHaConfig(r=4, alpha=8, rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\..*q_proj": 3})
    assert config.scale_for("model.layers.0.mlp.down_proj") == 4.0
    assert config.scale_for("model.layers.1.self_attn.q_proj") == 0.75
    assert config.scale_for("model.layers.0.self_attn.q_proj") == 2.0
    layer = moa_lycoris.LoHaLayer(config, "model.layers.0.mlp.down_proj", 128, 64)
    assert tuple(layer.hada_w1_a.shape) == (64, 2) and tuple(layer.hada_w2_b.shape) == (2, 128)


def test_refusals_name_the_option_and_the_next_step():
    with pytest.raises(AdapterConfigError, match=r"exclude_modules.*target_modules"):
        moa_lycoris.LoHaConfig(exclude_modules=["k_proj"]).validate()
    with pytest.raises(AdapterConfigError, match=r"layers_to_transform.*regex"):
        moa_lycoris.LoKrConfig(layers_to_transform=[0]).validate()
    with pytest.raises(AdapterConfigError, match=r"init_weights='gaussian'.*Choices: True, False, 'lycoris'"):
        moa_lycoris.LoKrConfig(init_weights="gaussian").validate()
    with pytest.raises(AdapterConfigError, match=r"rank_dropout must be in \[0, 1\)"):
        moa_lycoris.LoHaConfig(rank_dropout=1.5).validate()
    moa_lycoris.LoKrConfig(use_effective_conv2d=True).validate()  # a no-op on linear layers, as in PEFT


def test_dropout_while_training_follows_peft():
    """Module dropout skips the adapter; rank dropout zeroes output rows (LoHa rescales, LoKr on request)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    x = torch.randn(3, 16)
    skipped = moa_lycoris.LoHaLayer(moa_lycoris.LoHaConfig(r=2, init_weights=False, module_dropout=0.99), "m.q", 16, 12)
    skipped.eval()
    full = x @ skipped.delta_weight().T
    torch.testing.assert_close(skipped.delta(x, base), full)
    assert full.abs().max() > 0.1
    skipped.train()
    assert sum(bool(skipped.delta(x, base).abs().max() == 0) for _ in range(50)) >= 40
    with torch.no_grad():
        torch.manual_seed(1)
        torch.testing.assert_close(skipped.delta(x, base), torch.zeros(3, 12) if torch.rand(1) <= 0.99 else full)
    for layer, rescaled in (
        (moa_lycoris.LoHaLayer(moa_lycoris.LoHaConfig(r=2, init_weights=False, rank_dropout=0.5), "m.q", 16, 12), True),
        (moa_lycoris.LoKrLayer(moa_lycoris.LoKrConfig(r=2, init_weights=False, rank_dropout=0.5), "m.q", 16, 12), False),
        (moa_lycoris.LoKrLayer(moa_lycoris.LoKrConfig(r=2, init_weights=False, rank_dropout=0.5,
                                                      rank_dropout_scale=True), "m.q", 16, 12), True),
    ):
        layer.train()
        full = x @ layer.delta_weight().T
        torch.manual_seed(5)
        got = layer.delta(x, base)
        torch.manual_seed(5)
        torch.rand(1)  # the module-dropout draw comes first
        keep = (torch.rand(12) > 0.5).float()
        expected = full * (keep / keep.mean() if rescaled else keep)
        torch.testing.assert_close(got, expected)
        assert 0 < int(keep.sum()) < 12
